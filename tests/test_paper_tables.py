"""The paper's numbers we print beside ours (``abl/paper.py``) against the appendix text
itself: ``../shared/paper/abl-appendix.md`` (Li et al., NeurIPS 2021, appendix B.5 Table 7
and B.7 Table 8). A typo in the package's copy fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from abl.paper import TABLE6, TABLE7, TABLE8, TABLE8_BACKDOORED, TABLE10, TABLE11

APPENDIX = Path(__file__).resolve().parents[2] / "shared" / "paper" / "abl-appendix.md"


@pytest.fixture(scope="module")
def appendix() -> list[str]:
    if not APPENDIX.is_file():
        pytest.fail(f"{APPENDIX} is missing: the paper-table tests need ../shared beside the repo")
    return APPENDIX.read_text(encoding="utf-8").splitlines()


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("\t")]


def _pct(text: str) -> float:
    return float(re.sub(r"<[^>]+>|%", "", text))


def test_table8_matches_the_appendix(appendix):
    start = next(i for i, line in enumerate(appendix) if line.startswith("Table 8:"))
    by_label = {v["label"]: k for k, v in TABLE8.items()}
    paper_labels = {"Re-traing from Scratch": "Re-training from Scratch", "ABL (Ours)": "ABL (GGA)"}
    rows = {}
    for line in appendix[start + 1 : start + 20]:
        cells = _cells(line)
        label = paper_labels.get(cells[0], cells[0])
        if label in by_label:
            rows[label] = cells
    seen = set()
    for label, cells in rows.items():
        ours = by_label[label]
        want = TABLE8[ours]
        assert want["type"] == cells[1].lower(), label
        assert want["discard"] == (cells[2] == "Yes"), label
        assert _pct(cells[3]) == TABLE8_BACKDOORED["asr"] and _pct(cells[4]) == TABLE8_BACKDOORED["clean_acc"], label
        assert (want["asr"], want["clean_acc"]) == (_pct(cells[5]), _pct(cells[6])), label
        seen.add(ours)
    assert seen == set(TABLE8), f"rows not found in the appendix: {set(TABLE8) - seen}"


def test_table7_matches_the_appendix(appendix):
    start = next(i for i, line in enumerate(appendix) if line.startswith("Table 7:"))
    names = {"CIAFR-10": "cifar10", "GTSRB": "gtsrb", "ImageNet Subset": "imagenet_subset"}
    found = {}
    for line in appendix[start + 1 : start + 8]:
        cells = _cells(line)
        if cells[0] in names:
            found[names[cells[0]]] = dict(zip((0.0, 0.5, 1.0, 1.5), (_pct(c) for c in cells[1:5])))
    assert found == TABLE7


def _pairs(cells: list[str]) -> list[tuple[float, float]]:
    values = [_pct(c) for c in cells if c]
    return list(zip(values[0::2], values[1::2]))


def test_table6_matches_the_appendix(appendix):
    start = next(i for i, line in enumerate(appendix) if line.startswith("Table 6:"))
    attacks = ("badnets", "trojan", "blend", "dynamic")
    found = {}
    for line in appendix[start + 1 : start + 9]:
        cells = _cells(line)
        label = re.sub(r"<[^>]+>", "", cells[0])
        if label.isdigit():
            found[int(label)] = dict(zip(attacks, _pairs(cells[1:])))
    assert found == TABLE6


def _baseline_and_defense(appendix, table: str, attacks: tuple[str, ...], labels: dict[str, str]):
    start = next(i for i, line in enumerate(appendix) if line.startswith(f"{table}:"))
    found = {}
    for line in appendix[start + 1 : start + 6]:
        cells = _cells(line)
        if cells[0] in labels:
            found[labels[cells[0]]] = dict(zip(attacks, _pairs(cells[1:])))
    return found


def test_table10_matches_the_appendix(appendix):
    found = _baseline_and_defense(appendix, "Table 10", ("badnets", "trojan", "blend", "dynamic", "sig", "cl"),
                                  {"Baseline": "baseline", "ABL (Ours)": "abl"})
    assert found == TABLE10


def test_table11_matches_the_appendix(appendix):
    found = _baseline_and_defense(appendix, "Table 11", ("badnets", "trojan", "blend", "sig"),
                                  {"Baseline": "baseline", "NC + ABL Unlearning (Ours)": "nc_abl"})
    assert found == TABLE11

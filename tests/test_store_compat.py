"""Runs stored by the previous release still read, report and resume (issue 28).

``tests/fixtures/store_v1`` holds a finished and an interrupted run written before the
store was split into modules (see its README); they are copied to a temporary folder so
that the reads, the rebuilt index and the resume never touch the committed files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from abl.cli import main
from abl.experiment import resume_experiment
from abl.store import FINISHED, INTERRUPTED, RunStore

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store_v1" / "runs"


@pytest.fixture
def old_runs(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("ABL_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root)
    assert not (root / "index.sqlite").exists()
    return root


def _ids(root: Path) -> tuple[str, str]:
    finished = next(p.name for p in FIXTURE.iterdir() if "fixture-finished" in p.name)
    interrupted = next(p.name for p in FIXTURE.iterdir() if "fixture-interrupted" in p.name)
    return finished, interrupted


def test_the_store_reads_old_runs(old_runs: Path):
    fin_id, int_id = _ids(old_runs)
    store = RunStore(old_runs)
    runs = {r.run_id: r for r in store.list_runs()}
    assert set(runs) == {fin_id, int_id}
    assert (old_runs / "index.sqlite").is_file()  # rebuilt from the folders
    fin, stopped = runs[fin_id], runs[int_id]
    assert (fin.status, stopped.status) == (FINISHED, INTERRUPTED)
    stored = json.loads((old_runs / fin_id / "metrics.json").read_text())
    assert fin.final_metrics == pytest.approx(stored["final"])
    assert fin.metrics.keys() == stored.keys()
    assert stopped.final_metrics == {}
    got = store.get(fin_id[:15] + fin_id[15:22])
    assert got.config["dataset"]["name"] == "digits" and got.meta["git"]["dirty"] is False
    assert [h["phase"] for h in got.history()][:2] == ["isolation", "isolation"]
    assert len(got.history()) == 6
    mask = got.array("poison_mask")
    assert mask.dtype == np.bool_ and mask.shape == (400,) and mask.sum() == len(got.array("poison_indices"))
    assert got.tensors("model") and got.tensors("trigger")
    assert len(stopped.history()) == 3  # logged before the stop; its checkpoint holds 2


def test_abl_report_lists_old_runs_with_metrics(old_runs: Path, capsys, tmp_path: Path):
    fin_id, int_id = _ids(old_runs)
    assert main(["report", "--runs-dir", str(old_runs), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert fin_id[:24] in out and int_id[:24] in out  # the table may shorten long ids
    acc = json.loads((old_runs / fin_id / "metrics.json").read_text())["final"]["clean_acc"]
    assert f"{100 * acc:.1f}" in out
    assert f"abl resume {int_id}" in out
    assert (tmp_path / "rep" / "report.md").is_file()


def test_an_old_interrupted_run_resumes_to_finished(old_runs: Path):
    fin_id, int_id = _ids(old_runs)
    store = RunStore(old_runs)
    from abl import checkpoint

    kept = checkpoint.load(old_runs / int_id / checkpoint.FILE_NAME)["history"]
    assert len(kept) == 2
    assert "data_fingerprint" not in store.get(int_id).meta  # stored before fingerprints were
    with pytest.warns(UserWarning, match="could not be checked"):
        rec = resume_experiment(int_id, store)
    assert rec.run_id == int_id and rec.status == FINISHED
    assert not (old_runs / int_id / "checkpoint.safetensors").exists()
    history = rec.history()
    stored = [json.loads(line) for line in (FIXTURE / int_id / "history.jsonl").read_text().splitlines()]
    assert history[:2] == stored[:2]  # the checkpointed epochs are kept, not retrained
    assert [(h["phase"], h["epoch"]) for h in history] == [
        (h["phase"], h["epoch"]) for h in store.get(fin_id).history()
    ]
    finals = rec.final_metrics
    assert finals.keys() == store.get(fin_id).final_metrics.keys()
    assert all(math.isfinite(finals[k]) for k in ("clean_acc", "asr"))
    assert len(rec.meta["resumed"]) == 1

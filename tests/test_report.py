"""Reports built from the store: the table's numbers, valid PNGs, skip lines, unfinished runs."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from abl.errors import StoreError
from abl.report import runs_table, write_report
from abl.store import RunStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIG = {"dataset": {"name": "cifar10"}, "model": {"name": "wrn16_1"},
          "attack": {"name": "badnets"}, "defense": {"name": "abl"}}
PHASES = ["isolation"] * 2 + ["recovery"] * 3 + ["unlearning"] * 2


def _abl_run(store: RunStore, rng: np.random.Generator) -> str:
    """A finished ABL-shaped run with every artefact the report draws."""
    n, k = 200, 12
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, 20, replace=False)] = True
    e = len(PHASES)
    losses = rng.lognormal(mean=0.0, sigma=0.5, size=(e, n)).astype(np.float32)
    losses[:, mask] *= 0.01  # poisoned examples are learned fast: lower loss
    clean = np.flatnonzero(~mask)[:2]
    isolated = np.concatenate([np.argsort(losses[1])[: k - 2], clean])  # 2 false positives
    losses[5:, :] = np.nan  # unlearning trains only the isolated examples
    losses[5:, isolated] = 3.0
    with store.create_run(CONFIG, name="badnets-abl", seed=0) as run:
        for i, phase in enumerate(PHASES):
            run.log_epoch({"phase": phase, "epoch": i, "loss": 1.0 / (i + 1)})
            run.log_epoch({"phase": phase, "epoch": i, "clean_acc": 0.5 + 0.05 * i,
                           "asr": 1.0 if i < 5 else 0.05})
        run.save_array("example_losses", losses)
        run.save_array("poison_mask", mask)
        run.save_array("isolated_images", rng.integers(0, 256, size=(k, 3, 8, 8), dtype=np.uint8))
        run.save_array("isolated_is_poison", mask[isolated])
        run.save_array("isolated_indices", isolated.astype(np.int64))
        run.save_array("isolated_losses", losses[1, isolated])
        run.finish({"backdoored": {"clean_acc": 0.9, "asr": 1.0},
                    "final": {"clean_acc": 0.9312, "asr": 0.0123, "robust_acc": 0.875,
                              "iso_precision": 1.0, "iso_recall": 0.6}}, wall_s=61.27)
    return run.run_id


@pytest.fixture
def store_with_runs(tmp_path):
    store = RunStore(tmp_path / "runs")
    rng = np.random.default_rng(0)
    ids = {"abl": _abl_run(store, rng)}
    with store.create_run(CONFIG, name="plain", seed=1) as run:  # no arrays, no history
        run.finish({"final": {"clean_acc": 0.8, "asr": 0.99}}, wall_s=5.0)
    ids["plain"] = run.run_id
    with pytest.raises(RuntimeError):
        with store.create_run(CONFIG, name="crashed", seed=2) as run:
            run.log_epoch({"phase": "train", "epoch": 0, "clean_acc": 0.3, "asr": 0.4})
            raise RuntimeError("out of memory")
    ids["failed"] = run.run_id
    ids["running"] = store.create_run(CONFIG, name="still-going", seed=3).run_id
    return store, ids


def _table_row(text: str, run_id: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{run_id}`")]
    return [c.strip() for c in line.strip("|").split("|")]


def _check_png(path):
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0  # not a blank canvas


def test_write_report(store_with_runs, tmp_path):
    store, ids = store_with_runs
    out = tmp_path / "report"
    path = write_report(store, [ids["abl"][:-2], ids["plain"], ids["failed"], ids["running"]], out,
                        title="BadNets vs ABL")
    assert path == out / "report.md"
    text = path.read_text()
    assert text.startswith("# BadNets vs ABL\n")

    header = [c.strip() for c in text.splitlines()[4].strip("|").split("|")]
    assert header[:6] == ["run", "dataset", "model", "attack", "defense", "status"]
    assert _table_row(text, ids["abl"]) == [
        f"`{ids['abl']}`", "cifar10", "wrn16_1", "badnets", "abl", "finished",
        "93.12%", "1.23%", "87.50%", "100.00%", "60.00%", "61.3 s"]
    plain = _table_row(text, ids["plain"])
    assert plain[6:] == ["80.00%", "99.00%", "–", "–", "–", "5.0 s"]  # no RA / isolation
    for key, status in (("failed", "failed"), ("running", "running")):
        row = _table_row(text, ids[key])
        assert row[5] == status and row[6:] == ["–"] * 6
    assert "RuntimeError: out of memory" in text

    a = ids["abl"]
    for suffix in ("loss", "curves", "isolated"):
        assert f"]({a}-{suffix}.png)" in text
        _check_png(out / f"{a}-{suffix}.png")
    with open(out / f"{a}-isolated.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) == {"index", "loss", "is_poison", "file"}
    assert all(r["is_poison"] in ("true", "false") and math.isfinite(float(r["loss"])) for r in rows)

    # The run without artefacts gets skip lines, not figures.
    p = ids["plain"]
    assert "no per-example losses recorded" in text
    assert "no clean accuracy / ASR history recorded" in text
    assert "no isolated examples recorded" in text
    assert not list(out.glob(f"{p}-*"))
    # The failed run's history is drawn, but no final metrics are claimed for it.
    _check_png(out / f"{ids['failed']}-curves.png")
    section = text.split(f"`{ids['failed']}`)")[1].split("\n## ")[0]
    assert "no final metrics" in section and "%" not in section


def test_runs_table_columns_and_missing(store_with_runs):
    store, ids = store_with_runs
    recs = store.list_runs()
    table = runs_table(recs, columns=["run", "status", "asr", "clean_acc", "wall_s"])
    lines = table.splitlines()
    assert lines[0] == "| run | status | ASR | CA | wall time |" and len(lines) == 2 + len(recs)
    assert _table_row(table, ids["abl"])[2:] == ["1.23%", "93.12%", "61.3 s"]
    assert _table_row(table, ids["running"])[1:] == ["running", "–", "–", "–"]


def test_write_report_errors(store_with_runs, tmp_path):
    store, _ = store_with_runs
    with pytest.raises(StoreError, match="no run 'zzz'"):
        write_report(store, ["zzz"], tmp_path / "r")
    with pytest.raises(StoreError, match="no runs"):
        write_report(store, [], tmp_path / "r")


def test_malformed_arrays_are_skipped(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.create_run(CONFIG, name="odd", seed=0) as run:
        run.save_array("example_losses", np.ones((3, 5), dtype=np.float32))
        run.save_array("poison_mask", np.zeros(4, dtype=bool))  # wrong length
        run.save_array("isolated_images", np.zeros((2, 3, 4, 4), dtype=np.uint8))
        run.finish({"final": {"clean_acc": 0.5}}, wall_s=1.0)  # no isolated_is_poison: no ground truth
    text = write_report(store, [run.run_id], tmp_path / "r").read_text()
    assert "per-example losses have shape (3, 5) but the poison mask (4,)" in text
    # isolated images without ground truth (no known attack) are still drawn, unlabelled
    assert f"]({run.run_id}-isolated.png)" in text
    assert (tmp_path / "r" / f"{run.run_id}-isolated.png").stat().st_size > 0


def test_no_isolated_images_is_a_skip_line(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.create_run(CONFIG, name="plain", seed=0) as run:
        run.finish({"final": {"clean_acc": 0.5}}, wall_s=1.0)
    text = write_report(store, [run.run_id], tmp_path / "r").read_text()
    assert "no isolated examples recorded" in text


def test_a_run_without_ground_truth_is_reported_as_such(tmp_path):
    """``attack: null`` (a user's own folder): the isolated pictures carry their file names,
    the report says how many were isolated and shown, the loss plot compares the isolated
    examples with the rest instead of calling every example clean, and no NaN is printed."""
    from abl.report import loss_groups, tile_titles

    store = RunStore(tmp_path / "runs")
    n, k = 300, 80  # more isolated than the picture grid shows
    rng = np.random.default_rng(1)
    isolated = rng.choice(n, k, replace=False)
    files = np.array([f"train/airplane/scraped_{i:04d}_with_a_long_name.png" for i in isolated], dtype=np.str_)
    config = {**CONFIG, "attack": None, "dataset": {"name": "imagefolder"}}
    with store.create_run(config, name="own-folder", seed=0) as run:
        run.log_epoch({"phase": "isolation", "epoch": 0, "clean_acc": 0.4})
        run.save_array("example_losses", rng.random((1, n)).astype(np.float32))
        run.save_array("poison_mask", np.zeros(n, dtype=bool))
        run.save_array("isolated_indices", isolated.astype(np.int64))
        run.save_array("isolated_losses", np.sort(rng.random(k)).astype(np.float32))
        run.save_array("isolated_images", rng.integers(0, 256, size=(64, 3, 8, 8), dtype=np.uint8))
        run.save_array("isolated_files", files)
        run.finish({"isolation": {"clean_acc": 0.4, "iso_precision": math.nan, "iso_separation": 7.5},
                    "unlearning": {"clean_acc": 0.41, "iso_heldout_count": 4.0, "iso_heldout_fit_after": 0.0},
                    "final": {"clean_acc": 0.41, "iso_precision": math.nan, "iso_recall": math.nan}}, wall_s=3.0)
    rec = store.get(run.run_id)
    labels = [label for _, label, _ in loss_groups(rec, np.zeros(n, dtype=bool))]
    assert labels == ["isolated (suspicious)", "the rest"]
    sel = loss_groups(rec, np.zeros(n, dtype=bool))[0][0]
    assert set(np.flatnonzero(sel)) == set(isolated.tolist())
    titles = tile_titles(rec, 3)
    assert titles[0].startswith("scraped_") and "…" in titles[0] and titles[0].endswith(".png")
    text = write_report(store, [run.run_id], tmp_path / "report").read_text()
    assert "80 examples were isolated; the picture shows the first 64" in text
    assert "nothing here is known to be poisoned or clean" in text
    assert "rests on 4 suspects only" in text
    assert "nan" not in text.lower().replace("nance", "")
    rows = [line for line in text.splitlines() if line.startswith("| Isolation ")]
    assert not any(r.startswith("| Isolation precision |") for r in rows), \
        "an all-NaN metric is left out of the per-phase tables"
    assert "| Isolation separation | 7.50 |" in rows
    # with a known attack the plot keeps poisoned vs clean
    known = store.get(_abl_run(store, rng))
    assert [label for _, label, _ in loss_groups(known, known.array("poison_mask"))] == ["poisoned", "clean"]


def test_more_isolated_than_pictured_still_draws_the_grid_with_truth(tmp_path):
    """A run isolating more examples than it stores pictures of (500 at full scale, 64
    pictures): the grid is drawn, each picture bordered by its own poison flag."""
    store = RunStore(tmp_path / "runs")
    k, shown = 80, 64
    with store.create_run(CONFIG, name="many", seed=0) as run:
        run.save_array("isolated_indices", np.arange(k))
        run.save_array("isolated_is_poison", np.arange(k) % 2 == 0)
        run.save_array("isolated_images", np.zeros((shown, 3, 8, 8), dtype=np.uint8))
        run.finish({"final": {"clean_acc": 0.5}}, wall_s=1.0)
    text = write_report(store, [run.run_id], tmp_path / "r").read_text()
    assert f"]({run.run_id}-isolated.png)" in text, text
    assert "expected (K, 3, H, W)" not in text


def _part_run(store: RunStore, defense: dict, notes: dict | None, metrics: dict, attack: str = "badnets") -> str:
    with store.create_run({**CONFIG, "attack": {"name": attack}, "defense": defense}, name="part", seed=0) as run:
        if notes is not None:
            run.save_json("notes", notes)
        run.finish(metrics, wall_s=1.0)
    return run.run_id


def test_report_draws_figure7_and_table8_from_the_store(tmp_path):
    store = RunStore(tmp_path / "runs")
    ids = [
        _part_run(store, {"name": "detect", "detector": {"name": "spectral_signatures"}}, None,
                  {"final": {"iso_precision": 0.48, "iso_recall": 0.048, "iso_auprc": 0.31, "iso_count": 50.0}}),
        _part_run(store, {"name": "detect", "detector": {"name": "label_smoothing", "smoothing_value": 0.4}}, None,
                  {"final": {"iso_precision": 0.1, "iso_recall": 0.01, "iso_auprc": 0.12, "iso_count": 50.0}}),
        _part_run(store, {"name": "detect", "detector": {"name": "spectral_signatures"}}, None,
                  {"final": {"iso_precision": 0.9, "iso_recall": 0.09, "iso_auprc": 0.7, "iso_count": 50.0}}, attack="blend"),
    ]
    iso = {"clean_acc": 0.5, "asr": 1.0, "iso_precision": 1.0, "stage_s": 100.0}
    rec = {"clean_acc": 0.7, "asr": 1.0, "stage_s": 50.0}
    for name, extra, asr, hit in (("gga", {}, 0.02, 0.0), ("finetune_all", {"epochs": 5}, 0.99, 1.0)):
        ids.append(_part_run(store, {"name": "abl"}, {"detector": {"name": "lga_batch", "gamma": 0.5},
                                                        "unlearner": {"name": name, **extra}},
                             {"isolation": {**iso, "stage_hit": hit}, "recovery": rec,
                              "unlearning": {"clean_acc": 0.69, "asr": asr, "stage_s": 12.5},
                              "final": {"clean_acc": 0.69, "asr": asr, "iso_precision": 1.0, "iso_recall": 0.1}}))
    text = write_report(store, ids, tmp_path / "out").read_text()
    assert "## Isolation by detector (the ABL paper's Figure 7)" in text
    _check_png(tmp_path / "out" / "detectors.png")
    fig7 = [line for line in text.splitlines() if line.startswith("| badnets | label_smoothing 0.4 |")]
    assert fig7 == [f"| badnets | label_smoothing 0.4 | detect | 10.00% | 1.00% | 12.00% | 50 | `{ids[1]}` |"]
    assert any(line.startswith("| badnets | lga_batch | abl | 100.00% |") for line in text.splitlines())
    assert "## Unlearning methods (the ABL paper's Table 8)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| finetune_all", "| gga"))]
    assert len(rows) == 2, "the paper's row order: the alternatives, then ABL"
    assert rows[1] == (f"| gga | model-based | no | 100.00% | 70.00% | 2.00% | 69.00% | 3.04% | 86.11% | 12.5 s "
                       f"| trained (150.0 s) | `{ids[3]}` |")
    assert rows[0] == (f"| finetune_all (epochs=5) | model-based | yes | 100.00% | 70.00% | 99.00% | 69.00% | 100.00% "
                       f"| 85.02% | 12.5 s | cached | `{ids[4]}` |")


def test_no_comparison_sections_without_runs_to_compare(store_with_runs, tmp_path):
    store, ids = store_with_runs
    text = write_report(store, list(ids.values()), tmp_path / "out").read_text()
    assert "Figure 7" not in text and "Table 8" not in text and not (tmp_path / "out" / "detectors.png").exists()


def test_report_draws_the_mcr_curve(tmp_path):
    store = RunStore(tmp_path / "runs")
    curve = [{"t": t, "clean_acc": 0.8 - 0.1 * t, "asr": 1.0 - t} for t in (0.0, 0.5, 1.0)]
    rid = _part_run(store, {"name": "mcr", "t": 0.4}, {"curve": curve},
                    {"final": {"clean_acc": 0.75, "asr": 0.5}})
    text = write_report(store, [rid], tmp_path / "out").read_text()
    assert f"![CA and ASR along the curve]({rid}-mode-curve.png)" in text
    _check_png(tmp_path / "out" / f"{rid}-mode-curve.png")


def test_report_draws_neural_cleanse_triggers(tmp_path):
    import torch

    store = RunStore(tmp_path / "runs")
    with store.create_run({**CONFIG, "defense": {"name": "neural_cleanse"}}, name="nc", seed=0) as run:
        run.save_json("notes", {"anomaly_index": [5.0, 0.1, -0.3], "flagged": [0]})
        run.save_tensors("defense_artefacts", {"nc_masks": torch.rand(3, 1, 8, 8), "nc_patterns": torch.rand(3, 3, 8, 8)})
        run.finish({"final": {"clean_acc": 0.9, "asr": 1.0}}, wall_s=1.0)
    text = write_report(store, [run.run_id], tmp_path / "out").read_text()
    assert f"![Reversed trigger per class]({run.run_id}-nc-triggers.png)" in text
    _check_png(tmp_path / "out" / f"{run.run_id}-nc-triggers.png")


def test_report_draws_the_attack_on_training_images(tmp_path):
    """DFST stores clean / restyled examples and its style domain with the trigger; the
    report shows them (issue 11: "a grid of clean vs restyled images in the report")."""
    import torch

    store = RunStore(tmp_path / "runs")
    with store.create_run({**CONFIG, "attack": {"name": "dfst"}}, name="dfst", seed=0) as run:
        clean = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        run.save_tensors("trigger", {"examples_clean": clean, "examples_triggered": 255 - clean,
                                     "style_examples": clean[:2]})
        run.finish({"final": {"clean_acc": 0.9, "asr": 1.0}}, wall_s=1.0)
    with store.create_run(CONFIG, name="plain", seed=0) as plain:
        plain.save_tensors("trigger", {"mask": torch.ones(1, 8, 8)})
        plain.finish({"final": {"clean_acc": 0.9, "asr": 1.0}}, wall_s=1.0)
    text = write_report(store, [run.run_id, plain.run_id], tmp_path / "out").read_text()
    assert f"![Clean vs triggered images]({run.run_id}-attack-examples.png)" in text
    _check_png(tmp_path / "out" / f"{run.run_id}-attack-examples.png")
    assert not (tmp_path / "out" / f"{plain.run_id}-attack-examples.png").exists()


def test_weak_evidence_note_names_separation_and_label_share():
    """The report's warning gives both numbers, so a reader sees which test the isolation failed."""
    from types import SimpleNamespace

    from abl.report import _evidence_note

    weak = SimpleNamespace(metrics={"isolation": {"iso_weak": 1.0, "iso_separation": 6.01, "iso_top_label_share": 0.506}})
    text = "\n".join(_evidence_note(weak))
    assert "Weak isolation evidence" in text and "6.01 spreads" in text and "50.60% of them share one label" in text
    strong = SimpleNamespace(metrics={"isolation": {"iso_weak": 0.0, "iso_separation": 9.2, "iso_top_label_share": 1.0}})
    assert _evidence_note(strong) == []

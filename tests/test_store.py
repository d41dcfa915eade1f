"""The results store: round trips, failure states, validation, index recovery, lookups."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time

import numpy as np
import pytest
import torch

import abl
from abl import provenance
from abl import store as store_mod
from abl.errors import StoreError
from abl.store import RunStore

CONFIG = {
    "dataset": {"name": "cifar10", "root": "/data/cifar10"},
    "model": {"name": "wrn16_1"},
    "attack": "badnets",
    "defense": {"name": "abl", "isolation_ratio": 0.01},
    "train": {"epochs": 3, "lr": 0.1, "device": "cuda:0", "milestones": (1, 2)},
}
METRICS = {"backdoored": {"clean_acc": 0.91, "asr": 1.0}, "final": {"clean_acc": 0.88, "asr": 0.02, "n": 10}}


def _finished_run(store: RunStore, name: str = "badnets-abl", seed: int = 0):
    with store.create_run(CONFIG, name=name, seed=seed) as run:
        run.log_epoch({"phase": "isolation", "epoch": 0, "loss": 1.5, "clean_acc": 0.5})
        run.log_epoch({"phase": "unlearning", "epoch": 0, "loss": float("nan"), "clean_acc": np.float32(0.75)})
        run.save_array("poison_mask", np.array([True, False, False]))
        run.finish(METRICS, wall_s=12.5)
    return run


def test_round_trip(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = _finished_run(store)
    assert re.fullmatch(r"\d{8}-\d{6}-badnets-abl-[0-9a-f]{4}", run.run_id)
    files = {p.name for p in run.path.iterdir()}
    assert {"config.yaml", "meta.json", "history.jsonl", "metrics.json", "poison_mask.npy"} <= files
    assert not [f for f in files if f.startswith(".")]  # no temp files left behind

    (rec,) = store.list_runs()
    assert rec.run_id == run.run_id and rec.status == "finished" and rec.name == "badnets-abl"
    assert (rec.dataset, rec.model, rec.attack, rec.defense) == ("cifar10", "wrn16_1", "badnets", "abl")
    assert rec.wall_s == 12.5 and rec.finished and rec.started
    assert rec.metrics == METRICS and rec.final_metrics == METRICS["final"]

    got = store.get(run.run_id)
    assert got.metrics == METRICS
    assert got.config["train"]["milestones"] == [1, 2] and got.config["attack"] == "badnets"
    meta = got.meta
    assert meta["seed"] == 0 and meta["abl_version"] == abl.__version__
    assert meta["torch_version"] == torch.__version__ and meta["device"] == "cuda:0"
    assert meta["python_version"] and meta["hostname"]
    hist = got.history()
    assert [h["phase"] for h in hist] == ["isolation", "unlearning"]
    assert math.isnan(hist[1]["loss"]) and hist[1]["clean_acc"] == pytest.approx(0.75)
    assert got.array("poison_mask").tolist() == [True, False, False]
    # Files on disk are standard JSON (no NaN tokens).
    assert "NaN" not in (run.path / "history.jsonl").read_text()


def test_list_newest_first_and_filter(tmp_path):
    store = RunStore(tmp_path)
    a = _finished_run(store, "first")
    time.sleep(0.01)
    b = store.create_run(CONFIG, name="second", seed=1)
    assert [r.run_id for r in store.list_runs()] == [b.run_id, a.run_id]
    assert [r.run_id for r in store.list_runs("running")] == [b.run_id]
    assert [r.run_id for r in store.list_runs("finished")] == [a.run_id]
    with pytest.raises(StoreError, match="unknown run status"):
        store.list_runs("done")


def test_exception_inside_with_marks_failed(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with store.create_run(CONFIG, name="boom", seed=0) as run:
            run.log_epoch({"phase": "train", "epoch": 0, "loss": 2.0})
            1 / 0
    rec = store.get(run.run_id)
    assert rec.status == "failed" and "ZeroDivisionError" in rec.message
    assert rec.metrics == {} and rec.final_metrics == {}
    assert not (run.path / "metrics.json").exists()
    assert store.list_runs()[0].status == "failed"
    with pytest.raises(RuntimeError, match="already failed"):
        run.log_epoch({"phase": "train", "epoch": 1})


def test_explicit_fail_keeps_message(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run(CONFIG, name="x", seed=0)
    run.fail("diverged at epoch 3")
    assert store.get(run.run_id).message == "diverged at epoch 3"
    with pytest.raises(RuntimeError):
        run.finish(METRICS, wall_s=1.0)


def test_dropped_writer_stays_running(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run(CONFIG, name="interrupted", seed=0)
    run.log_epoch({"phase": "train", "epoch": 0, "loss": 2.0})
    run_id, path = run.run_id, run.path
    del run
    for rec in (store.get(run_id), store.list_runs()[0]):
        assert rec.status == "running" and rec.metrics == {}
    # A crash between metrics.json and meta.json: still not finished.
    (path / "metrics.json").write_text(json.dumps(METRICS))
    store.reindex()
    assert store.get(run_id).status == "running" and store.get(run_id).final_metrics == {}
    # meta.json claiming finished without metrics.json never looks finished either.
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "status": "finished"}))
    (path / "metrics.json").unlink()
    assert store.get(run_id).status == "failed"


def test_metrics_validated(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run(CONFIG, name="v", seed=0)
    with pytest.raises(ValueError, match="final.asr"):
        run.finish({"final": {"clean_acc": 0.9, "asr": "0.01"}}, wall_s=1.0)
    with pytest.raises(ValueError, match="finite or nan"):
        run.finish({"final": {"clean_acc": float("inf")}}, wall_s=1.0)
    with pytest.raises(ValueError):
        run.finish({"final": 0.9}, wall_s=1.0)
    assert store.get(run.run_id).status == "running"  # a rejected finish writes nothing
    assert not (run.path / "metrics.json").exists()
    run.finish({"final": {"clean_acc": 0.9, "iso_precision": float("nan")}}, wall_s=1.0)
    assert math.isnan(store.get(run.run_id).final_metrics["iso_precision"])
    assert math.isnan(store.list_runs()[0].final_metrics["iso_precision"])


def test_epoch_record_validated(tmp_path):
    run = RunStore(tmp_path).create_run(CONFIG, name="v", seed=0)
    with pytest.raises(ValueError, match="phase"):
        run.log_epoch({"epoch": 0, "loss": 1.0})
    with pytest.raises(ValueError, match="epoch"):
        run.log_epoch({"phase": "train", "loss": 1.0})
    with pytest.raises(ValueError, match="loss"):
        run.log_epoch({"phase": "train", "epoch": 0, "loss": [1.0]})
    with pytest.raises(ValueError, match="object"):
        run.save_array("bad", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="no path"):
        run.save_array("../escape", np.zeros(3))


def test_index_rebuilt_when_deleted_or_corrupt(tmp_path):
    store = RunStore(tmp_path)
    ids = {_finished_run(store, f"r{i}").run_id for i in range(2)}
    failed = store.create_run(CONFIG, name="f", seed=0)
    failed.fail("x")
    ids.add(failed.run_id)

    store.index_path.unlink()
    assert {r.run_id for r in store.list_runs()} == ids
    assert store.index_path.is_file()

    store.index_path.write_bytes(b"\x00garbage, not sqlite\xff" * 64)
    recs = store.list_runs()
    assert {r.run_id for r in recs} == ids
    assert {r.status for r in recs} == {"finished", "failed"}
    assert all(r.metrics == METRICS for r in recs if r.status == "finished")
    with sqlite3.connect(store.index_path) as conn:  # a valid database again
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 3

    # A corrupt index is also repaired when a writer next touches it.
    store.index_path.write_bytes(b"junk" * 100)
    run = _finished_run(store, "after")
    assert {r.run_id for r in store.list_runs()} == ids | {run.run_id}


def test_stale_index_rows_follow_the_folders(tmp_path):
    import shutil

    store = RunStore(tmp_path)
    a, b = _finished_run(store, "a"), _finished_run(store, "b")
    shutil.rmtree(a.path)
    assert [r.run_id for r in store.list_runs()] == [b.run_id]
    # An index row left "running" by a lost update is healed from the folder.
    with sqlite3.connect(store.index_path) as conn:
        conn.execute("UPDATE runs SET status='running', metrics='{}'")
    (rec,) = store.list_runs()
    assert rec.status == "finished" and rec.metrics == METRICS


def test_get_by_prefix_ambiguous_unknown(tmp_path):
    store = RunStore(tmp_path)
    a = store.create_run(CONFIG, name="alpha", seed=0)
    b = store.create_run(CONFIG, name="beta", seed=0)
    assert store.get(a.run_id).run_id == a.run_id
    assert store.get(a.run_id[:-3]).run_id == a.run_id
    stamp = a.run_id[:8]  # both share the date (unless this test straddles midnight UTC)
    if b.run_id.startswith(stamp):
        with pytest.raises(StoreError, match="ambiguous"):
            store.get(stamp)
    with pytest.raises(StoreError, match="no run 'nope'"):
        store.get("nope")
    with pytest.raises(StoreError, match="no run id"):
        store.get("")
    with pytest.raises(StoreError, match="no results store"):
        RunStore(tmp_path / "missing").get("x")
    with pytest.raises(StoreError, match="no results store"):
        RunStore(tmp_path / "missing").list_runs()


def test_safetensors_round_trip(tmp_path):
    store = RunStore(tmp_path)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    model[2].weight = torch.nn.Parameter(torch.randn(2, 2))
    with store.create_run(CONFIG, name="st", seed=0) as run:
        state = model.state_dict()
        state["tied"] = state["2.weight"]  # shared storage is fine
        state["view"] = state["0.weight"].transpose(0, 1)  # non-contiguous too
        run.save_tensors("model", state)
        run.finish(METRICS, wall_s=1.0)
    loaded = store.get(run.run_id).tensors("model")
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    fresh.load_state_dict({k: v for k, v in loaded.items() if k not in ("tied", "view")})
    with pytest.raises(StoreError, match="no tensors 'other'"):
        store.get(run.run_id).tensors("other")
    with pytest.raises(StoreError, match="no array 'x'"):
        store.get(run.run_id).array("x")


def test_git_revision_recorded(tmp_path):
    rev = store_mod.code_revision()
    if rev is None:
        pytest.skip("the abl package is not inside a git checkout here")
    run = RunStore(tmp_path).create_run(CONFIG, name="g", seed=0)
    git = json.loads((run.path / "meta.json").read_text())["git"]
    assert re.fullmatch(r"[0-9a-f]{40}", git["revision"]) and isinstance(git["dirty"], bool)


def test_git_revision_none_outside_a_checkout(tmp_path, monkeypatch):
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(provenance, "_CODE_DIR", outside)
    run = RunStore(tmp_path / "runs").create_run(CONFIG, name="g", seed=0)
    assert RunStore(tmp_path / "runs").get(run.run_id).meta["git"] is None
    # Without a git binary at all, recording still works.
    monkeypatch.setenv("PATH", str(outside))
    assert store_mod.code_revision() is None


def test_planted_run_id_in_meta_json_steers_no_path(tmp_path):
    """meta.json is user-editable: a run id like '../..' must not become a path (issue 8);
    the folder name is the id, and the report over the whole store still writes."""
    from abl.report import write_report

    store = RunStore(tmp_path / "runs")
    good, planted = _finished_run(store, "good"), _finished_run(store, "planted")
    meta_path = planted.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["run_id"] = "../../../outside"
    meta_path.write_text(json.dumps(meta))
    store.reindex()
    ids = {r.run_id for r in store.list_runs()}
    assert ids == {good.run_id, planted.run_id}
    rec = store.get(planted.run_id)
    assert rec.path == planted.path and "../../../outside" in rec.meta["message"]
    out = write_report(store, sorted(ids), tmp_path / "report")
    assert out.is_file() and not (tmp_path / "outside").exists()


def test_index_that_is_a_directory_is_a_clean_error(tmp_path):
    from abl.cli import main
    from abl.experiment import check_runs_dir
    from abl.errors import ConfigError

    store = RunStore(tmp_path / "runs")
    _finished_run(store)
    store.index_path.unlink()
    store.index_path.mkdir()
    with pytest.raises(StoreError, match="index.sqlite' is not a file: move it away"):
        store.list_runs()
    with pytest.raises(StoreError, match="is not a file"):
        store.create_run(CONFIG, name="x", seed=0)
    assert len([p for p in store.root.iterdir() if (p / "meta.json").exists()]) == 1, "no run folder was made"
    with pytest.raises(ConfigError, match="index.sqlite' is not a file"):
        check_runs_dir(store.root)
    assert main(["report", "--runs-dir", str(store.root)]) == 2


def test_store_modules_import_no_cycle():
    """Issue 28: the store's parts (atomic writes, run folder, writer, index, checkpoints)
    import each other in one direction only; ``abl.checkpoint`` never imports the store."""
    import ast
    from pathlib import Path

    parts = ("store", "checkpoint", "atomic", "run_folder", "run_writer", "run_index", "provenance")
    pkg = Path(abl.__file__).parent
    graph: dict[str, set[str]] = {}
    for part in parts:
        deps = set()
        for node in ast.walk(ast.parse((pkg / f"{part}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("abl."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("abl.")}
        graph[part] = deps & set(parts)
    assert "store" not in graph["checkpoint"] and "checkpoint" not in graph["store"]

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph[start])

    cycles = [p for p in parts if reaches(p, p)]
    assert cycles == [], f"import cycle through {cycles}: {graph}"

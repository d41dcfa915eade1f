"""Nothing is stored as finished on wrong data, and the store's edges give one-line errors
(issue 28, part A).

* ``abl resume`` checks the data's fingerprint, recorded when the run started, before it
  trains anything: files moved between class folders while the run was stopped are refused.
* A run started with ``train.checkpoint: false`` is not offered ``abl resume``, and
  resuming it is refused rather than silently restarted from epoch 0.
* A runs folder that cannot be made, ``abl report --out`` naming a file, and a read-only
  runs folder without its index: one line each (the last one reads the folders).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from abl.cli import main
from abl.errors import DataError, StoreError
from abl.experiment import build_experiment, resume_experiment, run_experiment
from abl.store import FINISHED, INTERRUPTED, RunStore, RunWriter

REPO = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, per_class: int = 12) -> Path:
    """``root/{train,test}/{cat,dog}/*.png``: 8x8 images, noisy, the classes' colours apart."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c, name in enumerate(("cat", "dog")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(80 + 100 * c, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{name}{i}.png")
    return root


def _raw(tmp_path: Path, dataset: dict, **train) -> dict:
    return {
        "name": "integrity",
        "seed": 0,
        "dataset": dataset,
        "model": {"name": "small_cnn", "width": 4},
        "attack": None,
        "defense": {"name": "none", "epochs": 4},
        "train": {"batch_size": 8, "eval_subset": 0, "progress": False, "threads": 1, "checkpoint_every_s": 0,
                  **train},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "save_model": False},
    }


class _Stop(KeyboardInterrupt):
    pass


def _stop_after(n: int):
    seen: list = []

    def on_epoch(record: dict) -> None:
        seen.append(record)
        if len(seen) == n:
            raise _Stop()

    return on_epoch


def _interrupted_run(raw: dict, store: RunStore, after: int = 2):
    with pytest.raises(_Stop):
        run_experiment(build_experiment(raw), store, on_epoch=_stop_after(after))
    (rec,) = store.list_runs()
    assert rec.status == INTERRUPTED
    return rec


def _one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("abl: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- data fingerprint


def test_resume_refuses_files_moved_between_class_folders(tmp_path, capsys):
    data = _image_folder(tmp_path / "pets")
    store = RunStore(tmp_path / "runs")
    rec = _interrupted_run(_raw(tmp_path, {"name": "imagefolder", "root": str(data), "size": 8}), store)
    recorded = rec.meta["data_fingerprint"]
    assert recorded["kind"] == "files" and recorded["dataset"] == "imagefolder" and len(recorded["parts"]) == 2
    history = (rec.path / "history.jsonl").read_text()

    for i in range(3):  # what a user tidying the folders may do while the run is stopped
        shutil.move(data / "train" / "cat" / f"cat{i}.png", data / "train" / "dog" / f"cat{i}.png")
    code = main(["resume", rec.run_id, "--runs-dir", str(store.root)])
    line = _one_line_error(code, capsys.readouterr().err, rec.run_id, "imagefolder data", str(data),
                           "changed since it started", "training files", "put the data back", "abl run")
    assert "test files" not in line  # names what changed, and only that
    after = store.get(rec.run_id)
    assert after.status == INTERRUPTED and not (after.path / "metrics.json").exists()
    assert (after.path / "history.jsonl").read_text() == history  # nothing trained
    assert (after.path / "checkpoint.safetensors").is_file()  # still resumable once the data is back

    for i in range(3):
        shutil.move(data / "train" / "dog" / f"cat{i}.png", data / "train" / "cat" / f"cat{i}.png")
    assert main(["resume", rec.run_id, "--runs-dir", str(store.root)]) == 0
    assert store.get(rec.run_id).status == FINISHED


def test_resume_refuses_changed_in_memory_data(tmp_path):
    """Data with no files (the bundled digits) is fingerprinted by its decoded tensors."""
    store = RunStore(tmp_path / "runs")
    raw = _raw(tmp_path, {"name": "digits", "size": 8})
    raw["slice"] = {"train": 120, "test": 60}
    rec = _interrupted_run(raw, store)
    fp = rec.meta["data_fingerprint"]
    assert fp["kind"] == "decoded" and [p.split(":")[0] for p in fp["parts"]] == ["120", "60"]
    # the same run had it been started on other digits (another slice of them)
    meta = json.loads((rec.path / "meta.json").read_text())
    meta["data_fingerprint"]["parts"][1] = "60:" + "0" * 32
    (rec.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="test images or labels: edited"):
        resume_experiment(rec.run_id, store)
    assert store.get(rec.run_id).status == INTERRUPTED


def test_a_run_stored_without_a_fingerprint_resumes_with_a_warning(tmp_path):
    store = RunStore(tmp_path / "runs")
    raw = _raw(tmp_path, {"name": "digits", "size": 8})
    raw["slice"] = {"train": 120, "test": 60}
    rec = _interrupted_run(raw, store)
    meta = json.loads((rec.path / "meta.json").read_text())
    del meta["data_fingerprint"]  # as the store wrote it before issue 28
    (rec.path / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="could not be checked"):
        assert resume_experiment(rec.run_id, store).status == FINISHED


# --------------------------------------------------------------------------- train.checkpoint: false


def test_a_run_without_checkpoints_is_not_offered_resume_and_refuses_it(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "cfg.yaml"
    raw = _raw(tmp_path, {"name": "digits", "size": 8}, checkpoint=False)
    raw["slice"] = {"train": 120, "test": 60}
    cfg.write_text(yaml.safe_dump(raw))
    real, calls = RunWriter.log_epoch, []

    def stop_at_second_epoch(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM, through the CLI's handler) does
        return real(self, record)

    monkeypatch.setattr(RunWriter, "log_epoch", stop_at_second_epoch)
    assert main(["run", str(cfg)]) == 130
    err = capsys.readouterr().err
    monkeypatch.setattr(RunWriter, "log_epoch", real)
    (rec,) = RunStore(tmp_path / "runs").list_runs()
    assert rec.status == INTERRUPTED and not (rec.path / "checkpoint.safetensors").exists()
    assert f"run {rec.run_id} stopped; it kept no checkpoint" in err and "abl resume" not in err

    code = main(["resume", rec.run_id, "--runs-dir", str(tmp_path / "runs")])
    _one_line_error(code, capsys.readouterr().err, rec.run_id, "kept no checkpoint", "train.checkpoint: false",
                    "start a new run")
    after = RunStore(tmp_path / "runs").get(rec.run_id)
    assert after.status == INTERRUPTED and len(after.history()) == 1  # not restarted from epoch 0

    assert main(["report", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "kept no checkpoint" in out and "abl resume" not in out


# --------------------------------------------------------------------------- one-line errors


def test_a_runs_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    from abl.data.datasets import Digits

    monkeypatch.setattr(Digits, "load", lambda *a, **k: pytest.fail("the data loaded before the runs dir was checked"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, {"name": "digits", "size": 8})))
    code = main(["run", str(cfg), "--runs-dir", "/proc/abl-runs"])
    _one_line_error(code, capsys.readouterr().err, "'/proc/abl-runs' cannot be made", "--runs-dir")
    assert not Path("/proc/abl-runs").exists()
    # the store itself says so too (a library caller skips the CLI's preflight)
    with pytest.raises(StoreError, match="'/proc/abl-runs' cannot be made"):
        RunStore("/proc/abl-runs").create_run({"a": 1}, name="x", seed=0)


def _finished_digits_run(tmp_path: Path) -> RunStore:
    raw = _raw(tmp_path, {"name": "digits", "size": 8})
    raw["slice"], raw["defense"] = {"train": 120, "test": 60}, {"name": "none", "epochs": 1}
    store = RunStore(tmp_path / "runs")
    run_experiment(build_experiment(raw), store)
    return store


def test_report_out_naming_an_existing_file_is_one_line(tmp_path, capsys):
    store = _finished_digits_run(tmp_path)
    target = tmp_path / "report.md"
    target.write_text("my notes\n")
    code = main(["report", "--runs-dir", str(store.root), "--out", str(target)])
    _one_line_error(code, capsys.readouterr().err, f"'{target}' is a file, not a folder", "--out")
    assert target.read_text() == "my notes\n"


def test_report_reads_a_read_only_runs_dir_without_its_index(tmp_path):
    store = _finished_digits_run(tmp_path)
    (run_id,) = [r.run_id for r in store.list_runs()]
    # a folder another user can read (pytest's own tmp folders are private to their owner)
    shared = Path(tempfile.mkdtemp(prefix="abl-ro-", dir="/tmp"))
    try:
        ro = shared / "runs"
        shutil.copytree(store.root, ro)
        (ro / "index.sqlite").unlink()
        for p in [shared, *ro.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        ro.chmod(0o555)
        cmd = [sys.executable, "-c", "import sys; from abl.cli import main; sys.exit(main())", "report",
               "--runs-dir", str(ro)]
        if os.geteuid() == 0:  # root writes anywhere: run as nobody, for whom the folder is read-only
            setpriv = shutil.which("setpriv")
            assert setpriv, "setpriv (util-linux) is needed to drop root for this test"
            cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=shared,
                             env={**os.environ, "PYTHONPATH": str(REPO), "HOME": str(shared)})
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert run_id in out.stdout and "finished" in out.stdout
        assert sorted(p.name for p in ro.iterdir()) == [run_id]  # nothing written
    finally:
        shared.chmod(0o755)
        (shared / "runs").chmod(0o755)
        shutil.rmtree(shared, ignore_errors=True)

"""Killed runs resume (issue 8): ``abl resume`` continues an interrupted run from its last
checkpoint and, on a CPU at a fixed thread count, ends exactly where an uninterrupted run
ends: the same model weights, metrics and per-epoch history, with no epoch logged twice.

The in-process tests stop a run by raising KeyboardInterrupt from the epoch callback (what
Ctrl-C or SIGTERM do), at points chosen to land mid-phase, at phase boundaries and after
the last epoch, for each ABL preset (ranking passes, the held-out best epoch, momentum
carried between phases). The subprocess test kills an ``abl run`` with SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from abl import checkpoint
from abl.errors import StoreError
from abl.experiment import build_experiment, resume_experiment, run_experiment
from abl.store import RunStore

ABL_SHORT = {"isolation_epochs": 3, "recovery_epochs": 3, "recovery_milestones": [2], "unlearning_epochs": 4}
DEFENSES = {
    # trajectory ranking, held-out selection with early stop, GGA over D_c
    "default": {"name": "abl", **ABL_SHORT, "isolation_count": "fixed", "isolation_rate": 0.05},
    # the default as shipped: the count decided from the scores (none here: 0 isolated, no unlearning)
    "default-auto": {"name": "abl", **ABL_SHORT},
    # an unlearning lr at which the held-out check keeps an early epoch and stops before the
    # last (measured: kept 4, stopped after 6 of 10; on another CPU's kernels, 2 of 5 with
    # 6 epochs and patience 3): the best epoch's weights, taken before the stop, must survive it
    "default-select": {
        "name": "abl", **ABL_SHORT, "isolation_count": "fixed", "isolation_rate": 0.05, "unlearning_epochs": 10,
        "unlearning_lr": 0.01,
        "unlearning_patience": 2,
    },
    # eval-mode ranking passes over the last 2 isolation epochs (kept in the engine's state)
    "paper-eval2": {"name": "abl", "preset": "paper", **ABL_SHORT, "rank_epochs": 2, "isolation_rate": 0.05},
    # momentum carried from recovery into the authors' ascent
    "official": {"name": "abl", "preset": "official", **ABL_SHORT, "isolation_rate": 0.05},
}


def _raw(tmp_path: Path, defense: dict, name: str = "resume") -> dict:
    return {
        "name": name,
        "seed": 0,
        "dataset": {"name": "digits"},
        "model": {"name": "small_cnn", "width": 8},
        "attack": {"name": "badnets", "rate": 0.1, "target": 0},
        "defense": defense,
        "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1, "checkpoint_every_s": 0},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "save_model": True},
    }


class _Stop(KeyboardInterrupt):
    pass


def _stopper(at: int):
    """An epoch callback that interrupts the run once ``at`` epochs are logged (the
    checkpoint of that epoch is then not yet written: it resumes from the one before)."""
    seen = []

    def on_epoch(record: dict) -> None:
        seen.append(record)
        if len(seen) == at:
            raise _Stop()

    return on_epoch


def _comparable(rec):
    metrics = {p: {k: v for k, v in m.items() if not k.endswith("_s")} for p, m in rec.metrics.items()}
    history = [{k: v for k, v in h.items() if k != "time_s"} for h in rec.history()]
    return metrics, history, rec.tensors("model")


def _assert_same(a, b) -> None:
    ma, ha, wa = _comparable(a)
    mb, hb, wb = _comparable(b)
    assert [(h["phase"], h["epoch"]) for h in ha] == [(h["phase"], h["epoch"]) for h in hb], "no epoch lost or repeated"
    assert ha == hb
    assert json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = {}
    for name, defense in DEFENSES.items():
        tmp = tmp_path_factory.mktemp(f"straight-{name}")
        out[name] = run_experiment(build_experiment(_raw(tmp, defense)), RunStore(tmp / "runs"))
    return out


@pytest.mark.parametrize(
    ("preset", "stop_at"),
    [
        ("default", 2),  # mid-isolation
        ("default", 4),  # first recovery epoch: resumes from the end of isolation
        ("default", 8),  # mid-unlearning: the best held-out epoch so far must survive
        ("default-select", None),  # after the kept epoch: it must come back from the checkpoint
        ("paper-eval2", 3),  # after the first ranking pass, before the second
        ("paper-eval2", 9),
        ("official", 7),  # first ascent epoch: the recovery momentum is carried in
        ("official", 9),
    ],
)
def test_resumed_run_ends_as_the_uninterrupted_one(tmp_path, uninterrupted, preset, stop_at):
    straight = uninterrupted[preset]
    total = len(straight.history())
    if stop_at is None:  # one epoch after the kept one (whose checkpoint is then the last written)
        kept = int(straight.metrics["unlearning"]["unlearn_epoch_kept"])
        assert kept < straight.metrics["unlearning"]["unlearn_epochs_run"], "the kept epoch must not be the last"
        stop_at = 6 + kept + 1
    assert stop_at <= total
    store = RunStore(tmp_path / "runs")
    with pytest.raises(_Stop):
        run_experiment(build_experiment(_raw(tmp_path, DEFENSES[preset])), store, on_epoch=_stopper(stop_at))
    (stopped,) = store.list_runs()
    assert stopped.status == "interrupted"
    assert (stopped.path / checkpoint.FILE_NAME).is_file()
    # the history file holds the epoch whose checkpoint was never written: it must go
    assert len(stopped.history()) == stop_at
    resumed = resume_experiment(stopped.run_id, store)
    assert resumed.status == "finished" and resumed.run_id == stopped.run_id
    assert not (resumed.path / checkpoint.FILE_NAME).exists(), "the checkpoint is removed when the run finishes"
    assert resumed.meta["resumed"], "the record says it was resumed"
    _assert_same(straight, resumed)


def test_a_run_interrupted_twice_still_ends_the_same(tmp_path, uninterrupted):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(_Stop):
        run_experiment(build_experiment(_raw(tmp_path, DEFENSES["default"])), store, on_epoch=_stopper(3))
    (rec,) = store.list_runs()
    with pytest.raises(_Stop):
        resume_experiment(rec.run_id, store, on_epoch=_stopper(3))  # 3 more epochs, then stop again
    assert store.get(rec.run_id).status == "interrupted"
    resumed = resume_experiment(rec.run_id, store)
    assert len(resumed.meta["resumed"]) == 2
    _assert_same(uninterrupted["default"], resumed)


def test_a_run_killed_after_training_resumes_without_training_again(tmp_path, uninterrupted, monkeypatch):
    """Stopped between its last epoch (unlearning stopped early by the held-out check) and
    the writing of its results: the resume trains nothing and writes the same results."""
    from abl.store import RunWriter

    real = RunWriter.save_array

    def stop_at_results(self, name, array):
        if name == "example_losses":
            raise _Stop()
        return real(self, name, array)

    store = RunStore(tmp_path / "runs")
    monkeypatch.setattr(RunWriter, "save_array", stop_at_results)
    with pytest.raises(_Stop):
        run_experiment(build_experiment(_raw(tmp_path, DEFENSES["default-select"])), store)
    monkeypatch.setattr(RunWriter, "save_array", real)
    (rec,) = store.list_runs()
    trained: list = []
    resumed = resume_experiment(rec.run_id, store, on_epoch=trained.append)
    assert trained == []
    straight = uninterrupted["default-select"]
    assert straight.metrics["unlearning"]["unlearn_epochs_run"] < DEFENSES["default-select"]["unlearning_epochs"]
    _assert_same(straight, resumed)


def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, uninterrupted):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(_Stop):
        run_experiment(build_experiment(_raw(tmp_path, DEFENSES["default"])), store, on_epoch=_stopper(1))
    (rec,) = store.list_runs()
    assert not (rec.path / checkpoint.FILE_NAME).exists()
    _assert_same(uninterrupted["default"], resume_experiment(rec.run_id, store))


def test_only_interrupted_runs_resume(tmp_path, uninterrupted):
    straight = uninterrupted["default"]
    store = RunStore(straight.path.parent)
    with pytest.raises(StoreError, match="already finished"):
        resume_experiment(straight.run_id, store)
    with pytest.raises(StoreError, match="no run"):
        resume_experiment("nope", store)


def test_a_corrupt_checkpoint_is_a_clear_error_and_nothing_is_finished(tmp_path):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(_Stop):
        run_experiment(build_experiment(_raw(tmp_path, DEFENSES["default"])), store, on_epoch=_stopper(3))
    (rec,) = store.list_runs()
    path = rec.path / checkpoint.FILE_NAME
    path.write_bytes(path.read_bytes()[:200])  # torn
    with pytest.raises(StoreError, match="checkpoint .* is unreadable"):
        resume_experiment(rec.run_id, store)
    assert store.get(rec.run_id).status == "interrupted"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid, empty safetensors file
    with pytest.raises(StoreError, match="not an abl-checkpoint"):
        resume_experiment(rec.run_id, store)


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {
        "a": [torch.arange(4), {"b": None, "c": [1.5, float("nan"), "x"]}],
        "opt": checkpoint.optimizer_state(opt),
        "empty": [],
    }
    path = tmp_path / checkpoint.FILE_NAME
    checkpoint.save(path, state)
    back = checkpoint.load(path)
    assert torch.equal(back["a"][0], torch.arange(4))
    assert back["a"][1]["b"] is None and back["a"][1]["c"][0] == 1.5 and math.isnan(back["a"][1]["c"][1])
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.5, momentum=0.9)
    checkpoint.load_optimizer_state(opt2, back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], torch.ones(3))
    assert opt2.param_groups[0]["lr"] == 0.1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE_NAME], "no temp file left behind"
    with pytest.raises(TypeError, match="keys must be strings"):
        checkpoint.save(path, {"x": {1: 2}})
    with pytest.raises(TypeError, match="holds a object"):
        checkpoint.save(path, {"x": object()})
    assert torch.equal(checkpoint.load(path)["a"][0], torch.arange(4)), "a refused save leaves the old file"


CLI = "import sys; from abl.cli import main; sys.exit(main(sys.argv[1:]))"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, **kw)


def test_sigkill_mid_phase_then_abl_resume_matches_the_uninterrupted_run(tmp_path):
    """The real thing: `abl run` killed with SIGKILL during recovery, `abl resume` from the
    command line, against the same config run without interruption."""
    raw = _raw(tmp_path, {**DEFENSES["default"], "recovery_epochs": 12, "recovery_milestones": [8]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    straight_dir = tmp_path / "straight"
    done = _cli("run", str(tmp_path / "c.yaml"), "--runs-dir", str(straight_dir))
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(tmp_path / "c.yaml"), "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once it is 6 epochs into recovery
        hist = list(runs.glob("*/history.jsonl"))
        if hist and sum('"recovery"' in line for line in hist[0].read_text().splitlines()) >= 6:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill: {proc.communicate()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    folder = hist[0].parent
    report = _cli("report", "--runs-dir", str(runs))
    assert f"continue it with: abl resume {folder.name} --runs-dir {runs}" in report.stdout, report.stdout
    again = _cli("resume", folder.name, "--runs-dir", str(runs))
    assert again.returncode == 0, again.stderr
    assert f"run {folder.name} finished" in again.stdout
    store_a, store_b = RunStore(straight_dir), RunStore(runs)
    _assert_same(store_a.list_runs()[0], store_b.get(folder.name))
    twice = _cli("resume", folder.name, "--runs-dir", str(runs))
    assert twice.returncode == 2 and "already finished" in twice.stderr


def test_a_run_stopped_by_systemexit_is_interrupted_and_resumes(tmp_path):
    """A Ray worker whose sweep driver was stopped (Ctrl-C, SIGTERM) leaves through
    SystemExit; that run was marked failed, its checkpoint dropped, and the rerun of the
    grid started the cell over. It is an interruption: it resumes."""
    seen = []

    def on_epoch(record: dict) -> None:
        seen.append(record)
        if len(seen) == 3:
            raise SystemExit(1)

    store = RunStore(tmp_path / "runs")
    with pytest.raises(SystemExit):
        run_experiment(build_experiment(_raw(tmp_path, DEFENSES["default"])), store, on_epoch=on_epoch)
    (rec,) = store.list_runs()
    assert rec.status == "interrupted"
    assert rec.path.joinpath("checkpoint.pt").is_file() or any(rec.path.glob("checkpoint*")), "the checkpoint is kept"
    done = resume_experiment(rec.run_id, store)
    assert done.status == "finished"
    assert [h["epoch"] for h in done.history()][:3] == [0, 1, 2]  # the epochs before the stop were kept

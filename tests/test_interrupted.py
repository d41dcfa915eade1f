"""A run that dies is seen as dead (issue 8): SIGTERM is handled like Ctrl-C, a SIGKILLed
run shows as interrupted from its recorded process, and the run folders, not the index,
decide what is shown."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abl.store import RunStore

# digits, enough epochs that the run is still training when the signal comes
CONFIG = """\
name: long-digits
dataset: {name: digits}
model: {name: small_cnn, width: 8}
attack: {name: badnets, rate: 0.1}
defense: {name: none, epochs: 400, lr: 0.05}
train: {batch_size: 256, eval_every: 0, progress: false, threads: 1}
"""


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "c.yaml").write_text(CONFIG)
    runs = tmp_path / "runs"
    code = "import sys; from abl.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", str(tmp_path / "c.yaml"), "--runs-dir", str(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # wait until it has logged two epochs (then it is inside the training loop)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hist = list(runs.glob("*/history.jsonl"))
        if hist and len(hist[0].read_text().splitlines()) >= 2:
            return proc, hist[0].parent
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the signal: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run logged no epochs within 120 s")


def test_sigterm_marks_the_run_interrupted(tmp_path):
    proc, folder = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "abl: interrupted"
    assert f"continue it with: abl resume {folder.name} --runs-dir" in err, err
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["pid"] == proc.pid
    assert not (folder / "metrics.json").exists(), "nothing half-written is presented as a result"
    (rec,) = RunStore(tmp_path / "runs").list_runs(status="interrupted")
    assert rec.path == folder


def test_sigkilled_run_is_shown_interrupted_not_running(tmp_path):
    proc, folder = _start(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, meta.json still says running
    proc.communicate(timeout=60)
    assert json.loads((folder / "meta.json").read_text())["status"] == "running"
    store = RunStore(tmp_path / "runs")
    (rec,) = store.list_runs()
    assert rec.status == "interrupted" and f"pid {proc.pid}" in rec.message
    assert store.get(rec.run_id).status == "interrupted"
    # an index row edited to say "finished" does not make it so: the folder decides
    with sqlite3.connect(store.index_path) as conn:
        conn.execute("UPDATE runs SET status='finished'")
    assert [r.status for r in store.list_runs()] == ["interrupted"]
    assert store.list_runs(status="finished") == []


def test_a_live_run_stays_running_and_another_hosts_stale_run_is_interrupted(tmp_path):
    store = RunStore(tmp_path / "runs")
    live = store.create_run({"name": "x"}, name="live", seed=0)  # this process: alive
    assert store.get(live.run_id).status == "running"
    other = store.create_run({"name": "y"}, name="elsewhere", seed=0)
    meta_path = other.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["hostname"] = "some-other-host"
    meta_path.write_text(json.dumps(meta))
    assert store.get(other.run_id).status == "running", "a fresh heartbeat from another host: maybe alive"
    old = time.time() - 2 * 3600
    os.utime(other.path / "heartbeat", (old, old))
    rec = store.get(other.run_id)
    assert rec.status == "interrupted" and "no sign of life for 2.0 h" in rec.message

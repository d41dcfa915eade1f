"""``abl sweep`` (issue 12): grids of experiments as Ray tasks, resumable and idempotent,
results in the driver's store, shared stages computed once across workers, tables with
mean ± sd over seeds. The Ray tests start a local Ray with 2 CPUs on digits."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from abl.errors import AblError, ConfigError
from abl.experiment import build_experiment
from abl.store import FINISHED, RunStore
from abl.sweep import Grid, cell_id, disagreement, finished_cells, group_stats, ingest, load_grid, run_sweep, sweep_table

CLI = "import sys; from abl.cli import main; sys.exit(main(sys.argv[1:]))"
BASE = {
    "name": "grid",
    "dataset": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 8},
    "attack": {"name": "badnets", "rate": 0.1, "target": 0, "size": 3},
    "defense": {"name": "none", "epochs": 6, "milestones": [4]},
    "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "checkpoint_every_s": 0},
}
AXES = {"attack": ["badnets", "blend"], "attack.rate": [0.05, 0.1]}


def _grid_file(tmp_path: Path, base=None, axes=None, **extra) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "base": base or BASE, "axes": axes or AXES, **extra}))
    return path


# -- the grid file -----------------------------------------------------------------------------


def test_axes_and_seeds_expand_in_order_and_a_component_axis_keeps_the_parameters_it_takes(tmp_path):
    grid = load_grid(_grid_file(tmp_path), seeds=2)
    cells = grid.cells()
    assert [c.label() for c in cells[:3]] == [
        "attack=badnets, attack.rate=0.05, seed=0", "attack=badnets, attack.rate=0.05, seed=1",
        "attack=badnets, attack.rate=0.1, seed=0"]
    assert len(cells) == 8 and len({c.cell_id for c in cells}) == 8
    blend = next(c for c in cells if c.values["attack"] == "blend" and c.values["attack.rate"] == 0.05)
    # badnets' patch size is not a blend parameter: dropped; rate and target are kept
    assert blend.raw["attack"] == {"name": "blend", "rate": 0.05, "target": 0}
    assert blend.raw["seed"] == blend.values["seed"]


def test_the_cell_id_is_the_resolved_config_without_output_and_threads():
    exp = build_experiment(dict(BASE))
    same = build_experiment({**BASE, "train": {**BASE["train"], "threads": 2}, "output": {"runs_dir": "elsewhere"}})
    other = build_experiment({**BASE, "defense": {**BASE["defense"], "epochs": 7}})
    assert cell_id(exp.resolved()) == cell_id(same.resolved())
    assert cell_id(exp.resolved()) != cell_id(other.resolved())
    # defaults are filled in before hashing: spelling one out changes nothing
    spelled = build_experiment({**BASE, "attack": {**BASE["attack"], "labelling": "all2one"}})
    assert cell_id(spelled.resolved()) == cell_id(exp.resolved())


@pytest.mark.parametrize("change, needle", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"axes": {"attack.rate": []}}, "axis 'attack.rate' must be a non-empty list"),
    ({"axes": {"seed": [0, 1]}}, "give seeds with 'seeds: N'"),
    ({"base": "nowhere.yaml"}, "base config 'nowhere.yaml' not found"),
    ({"seeds": 0}, "'seeds' must be >= 1"),
    ({"axes": {"attack.rate": [0.1, 2.0]}}, "cell attack.rate=2.0: "),
    ({"axes": {"attack": ["badnets", "nosuch"]}}, "unknown attack 'nosuch'"),
    ({"axes": {"attack.rate": [0.1, 0.1]}}, "are the same experiment"),
])
def test_a_bad_grid_is_refused_with_the_reason(tmp_path, change, needle):
    raw = {"name": "g", "base": BASE, "axes": AXES, **change}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=None) as err:
        load_grid(tmp_path / "grid.yaml").cells()
    assert needle in str(err.value)


def test_the_cli_refuses_a_bad_grid_before_starting_anything(tmp_path):
    path = _grid_file(tmp_path, axes={"attack.rate": [0.1, 2.0]})
    out = subprocess.run([sys.executable, "-c", CLI, "sweep", str(path), "--runs-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "abl: error: grid 'g', cell attack.rate=2.0" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_runs_dir_that_cannot_be_made_stops_the_sweep_before_any_cell(tmp_path):
    """The runs are gathered into --runs-dir at the end: a folder that cannot be made (/proc)
    is refused before Ray starts or any cell trains, as `abl run` does."""
    path = _grid_file(tmp_path)
    out = subprocess.run([sys.executable, "-c", CLI, "sweep", str(path), "--runs-dir", "/proc/abl-sweep-runs"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "'/proc/abl-sweep-runs' cannot be made" in line and "--runs-dir" in line
    assert "cells" not in out.stdout, "no cell was planned or started"


def test_without_ray_the_sweep_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    grid = load_grid(_grid_file(tmp_path))
    with pytest.raises(AblError, match=r'pip install -e "\.\[sweep\]"'):
        run_sweep(grid, tmp_path / "runs", progress=lambda _: None)


@pytest.mark.xdist_group("ray")
def test_a_cluster_with_a_gpu_and_no_gpu_share_stops_instead_of_training_on_the_cpu(tmp_path):
    """Ray hides the GPUs from a task that asks for none: on a cluster with a GPU (faked:
    ``ray.init(num_gpus=1)`` on this CPU machine) a sweep without --gpus-per-run says so and
    stops before any cell runs."""
    import ray

    from abl.sweep import check_gpu_share

    grid = load_grid(_grid_file(tmp_path))
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=128 * 1024**2)
    try:
        assert ray.cluster_resources().get("GPU") == 1
        with pytest.raises(AblError, match=r"has 1 GPU but --gpus-per-run is 0.*4 cells would train on the CPU") as err:
            run_sweep(grid, tmp_path / "runs", progress=lambda _: None)
        assert "\n" not in str(err.value)
        assert not (tmp_path / "runs").exists() or not RunStore(tmp_path / "runs").list_runs(), "nothing ran"
    finally:
        ray.shutdown()
    cells = grid.cells()
    check_gpu_share({"CPU": 2.0}, 0.0, cells)  # no GPU: the CPU is all there is
    check_gpu_share({"CPU": 2.0, "GPU": 1.0}, 0.25, cells)  # a share asked for
    on_cpu = load_grid(_grid_file(tmp_path), overrides=["train.device=cpu"]).cells()
    check_gpu_share({"CPU": 2.0, "GPU": 1.0}, 0.0, on_cpu)  # the CPU on purpose


def test_cells_starting_together_decode_a_dataset_once(tmp_path):
    """Runs that load the same uncached dataset at once (cells on one node) decode it once:
    the first decodes and writes under the cache's lock, the others wait and read it."""
    import torch

    from abl.data import cache
    from abl.data.types import DatasetSplits, ImageSplit

    decodes = []
    start = threading.Barrier(3)

    def build():
        decodes.append(threading.get_ident())
        time.sleep(0.5)  # a slow decode: the others arrive while it runs
        split = ImageSplit(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
        return DatasetSplits("toy", split, split, 2, ["a", "b"])

    results = []

    def load():
        start.wait()
        results.append(cache.load_cached("toy", {"v": 1}, ["fp"], build, tmp_path))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and all(torch.equal(r.train.labels, results[0].train.labels) for r in results)
    assert len(decodes) == 1, f"decoded {len(decodes)} times"


# -- tables ------------------------------------------------------------------------------------


def test_the_table_shows_mean_and_sd_over_seeds_and_flags_seeds_that_disagree(tmp_path):
    grid = Grid("g", dict(BASE), [("attack.rate", [0.05, 0.1])], seeds=[0, 1, 2])
    cells = grid.cells()
    asr = {0.05: [0.97, 0.99, 0.98], 0.1: [0.02, 0.90, 0.05]}  # the second group's seeds disagree
    records = {}
    for c in cells:
        value = asr[c.values["attack.rate"]][c.values["seed"]]
        records[c.cell_id] = SimpleNamespace(final_metrics={"asr": value, "clean_acc": 0.9})
    rows = group_stats(cells, records)
    assert [r["seeds"] for r in rows] == [3, 3]
    assert rows[0]["asr"]["mean"] == pytest.approx(98.0)
    assert rows[1]["asr"]["sd"] == pytest.approx(statistics.stdev([2.0, 90.0, 5.0]))
    assert disagreement(rows[0], 10.0) == [] and disagreement(rows[1], 10.0) == ["asr"]
    table = sweep_table(cells, records, ["attack.rate"])
    assert "| 0.05 | 3/3 | 90.00% ± 0.00 | 98.00% ± 1.00 |  |" in table
    assert "**ASR 2.00%–90.00%**" in table


def test_the_table_names_each_cells_variant(tmp_path):
    grid = Grid("g", dict(BASE), [("attack.rate", [0.05, 0.1])],
                variants=[("BadNets", {"attack.name": "badnets"}), ("Blend", {"attack": {"name": "blend"}})])
    cells = grid.cells()
    records = {c.cell_id: SimpleNamespace(final_metrics={"asr": 0.5 if c.values["variant"] == "Blend" else 0.9})
               for c in cells}
    table = sweep_table(cells, records)
    assert table.splitlines()[0].startswith("| variant | attack.rate | seeds |")
    assert "| Blend | 0.1 | 1/1 | 50.00% |" in table and "| BadNets | 0.05 | 1/1 | 90.00% |" in table


def test_a_worker_archive_that_escapes_the_run_folder_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    store = RunStore(tmp_path / "runs")
    with pytest.raises(AblError, match="unexpected archive entry '../evil.txt'"):
        ingest(store, {"cell": "c", "status": FINISHED, "run_id": "r1", "tar": buf.getvalue()})
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "runs" / "r1").exists()


def _run_tar(run_id: str, cell: str) -> bytes:
    """A minimal finished run folder, packed as a worker sends it."""
    files = {
        "meta.json": json.dumps({"run_id": run_id, "name": "g", "status": FINISHED}).encode(),
        "metrics.json": json.dumps({"final": {"clean_acc": 0.9}}).encode(),
        "config.yaml": yaml.safe_dump({"sweep": {"cell": cell}}).encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{run_id}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_ingesting_a_grid_reads_each_run_folder_once_not_once_per_cell(tmp_path, monkeypatch):
    """The driver's duplicate check looks only at folders it has not read yet: 30 cells
    cost about 30 folder reads (rescanning the store per cell would cost 465)."""
    import abl.sweep as sweep_mod
    from abl.sweep import CellIndex

    reads = []
    real = sweep_mod._record_from_folder
    monkeypatch.setattr(sweep_mod, "_record_from_folder", lambda folder: reads.append(folder.name) or real(folder))
    store = RunStore(tmp_path / "runs")
    index = CellIndex(store)
    for i in range(30):
        rec = ingest(store, {"cell": f"c{i}", "status": FINISHED, "run_id": f"r{i:02d}", "tar": _run_tar(f"r{i:02d}", f"c{i}")},
                     index)
        assert rec is not None and rec.run_id == f"r{i:02d}"
    assert len(reads) <= 30, f"{len(reads)} folder reads for 30 cells"
    assert set(index.refresh()) == {f"c{i}" for i in range(30)}
    # a cell another driver stored meanwhile is still found: the duplicate is not added
    dup = ingest(store, {"cell": "c7", "status": FINISHED, "run_id": "r99", "tar": _run_tar("r99", "c7")}, index)
    assert dup.run_id == "r07" and not (store.root / "r99").exists()
    (store.root / "r50").mkdir()  # a run that arrived from elsewhere after the index was built
    (store.root / "r50" / "meta.json").write_text(json.dumps({"run_id": "r50", "status": FINISHED}))
    (store.root / "r50" / "metrics.json").write_text("{}")
    (store.root / "r50" / "config.yaml").write_text(yaml.safe_dump({"sweep": {"cell": "c50"}}))
    assert ingest(store, {"cell": "c50", "status": FINISHED, "run_id": "r51", "tar": _run_tar("r51", "c50")},
                  index).run_id == "r50"


# -- on a local Ray ------------------------------------------------------------------------------


def _finished_by_cell(runs: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rec in RunStore(runs).list_runs(status=FINISHED):
        out.setdefault(rec.config["sweep"]["cell"], []).append(rec.run_id)
    return out


@pytest.mark.xdist_group("ray")
def test_a_killed_driver_reruns_to_four_finished_runs_without_duplicates(tmp_path):
    """The issue's test: a 2x2 grid on digits on a local Ray (2 CPUs), the driver killed with
    SIGKILL after the first cell finished, the same command again: four finished runs, one
    per cell, nothing run twice."""
    path = _grid_file(tmp_path)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-c", CLI, "sweep", str(path), "--runs-dir", str(runs), "--num-cpus", "2",
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    for line in proc.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if line.startswith("[1/4 done"):
            break
    else:
        pytest.fail("the driver ended before its first cell finished:\n" + "".join(seen))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first = _finished_by_cell(runs)
    assert 1 <= len(first) < 4, first
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"4 cells, {len(first)} already finished, {4 - len(first)} to run" in again.stdout
    by_cell = _finished_by_cell(runs)
    assert len(by_cell) == 4 and all(len(ids) == 1 for ids in by_cell.values()), by_cell
    for cid, ids in first.items():
        assert by_cell[cid] == ids  # the runs from before the kill are kept, not redone
    assert set(by_cell) == {c.cell_id for c in load_grid(path).cells(threads=1)}
    assert "| blend | 0.1 | 1/1 |" in (runs / "sweep-g.md").read_text()
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "4 already finished, 0 to run" in third.stdout
    assert _finished_by_cell(runs) == by_cell


@pytest.mark.xdist_group("ray")
def test_a_cell_whose_worker_was_killed_is_resumed_in_its_run_folder(tmp_path):
    """A worker killed mid-cell leaves an interrupted run in the cell's work folder; the next
    sweep resumes that run (same id, checkpoint) instead of starting over."""
    grid = Grid("g", {**BASE, "defense": {"name": "none", "epochs": 12, "milestones": [8]}}, [("attack.rate", [0.1])])
    (cell,) = grid.cells(threads=1)
    runs = tmp_path / "runs"
    work = runs / ".sweep" / cell.cell_id
    code = ("import sys, json; from abl.sweep import run_cell; "
            "run_cell(json.loads(sys.argv[1]), sys.argv[2], {'grid': 'g'}, sys.argv[3])")
    import json

    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cell.raw), cell.cell_id, str(work)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        hist = list(work.glob("*/history.jsonl"))
        if hist and len(hist[0].read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, "the cell ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_id = hist[0].parent.name
    lines: list[str] = []
    result = run_sweep(grid, runs, num_cpus=2, progress=lines.append)
    rec = result.records[cell.cell_id]
    assert rec.run_id == killed_id and any("(resumed)" in line for line in lines), lines
    assert len([h for h in rec.history() if h.get("phase") == "train"]) == 12
    assert finished_cells(RunStore(runs)).keys() == {cell.cell_id}
    assert not work.exists()  # the work folder is cleared once the run is in the store


@pytest.mark.xdist_group("ray")
def test_cells_sharing_an_isolation_compute_it_once_across_workers(tmp_path):
    """Two ABL cells that differ only in their unlearner run at the same time on two Ray
    workers with one stage cache: one isolates and stores the stage, the other waits for
    it and reads it."""
    base = {**BASE, "defense": {"name": "abl", "isolation_epochs": 4, "isolation_lr": 0.05, "recovery_epochs": 2,
                                "recovery_lr": 0.05, "unlearning_epochs": 2, "isolation_rate": 0.05,
                                "cache_stages": True},
            "output": {"cache_dir": str(tmp_path / "cache")}}
    grid = Grid("g", base, [("defense.unlearner", [{"name": "gga", "epochs": 2}, {"name": "finetune_all", "epochs": 2}])])
    result = run_sweep(grid, tmp_path / "runs", num_cpus=2, progress=lambda _: None)
    assert not result.failed and len(result.records) == 2
    hits = sorted(r.metrics["isolation"]["stage_hit"] for r in result.records.values())
    assert hits == [0.0, 1.0]


@pytest.mark.xdist_group("ray")
def test_a_cell_whose_stage_is_busy_yields_its_worker_to_other_cells(tmp_path):
    """Cells A and B share an isolation stage that another process is computing (the test
    holds its lock): rather than holding both workers idle, each comes back "busy" and is
    queued behind C, which runs meanwhile; once the stage's lock is free, A and B run
    again, waiting this time: one computes the stage, the other reads it."""
    from abl.experiment import run_experiment
    from abl.stages import StageLock

    defense = {"name": "abl", "isolation_epochs": 4, "isolation_lr": 0.05, "recovery_epochs": 2, "recovery_lr": 0.05,
               "unlearning_epochs": 2, "isolation_rate": 0.05, "cache_stages": True}
    base = {**BASE, "defense": defense, "output": {"cache_dir": str(tmp_path / "cache")}}
    grid = Grid("g", base, [], variants=[
        ("A", {"defense.unlearner": {"name": "gga", "epochs": 2}}),
        ("B", {"defense.unlearner": {"name": "finetune_all", "epochs": 2}}),
        ("C", {"attack.rate": 0.05})])
    cells = grid.cells(threads=1)
    # the shared stage's file name (its key) from one run of A in a cache of its own
    probe = build_experiment({**cells[0].raw, "output": {"cache_dir": str(tmp_path / "probe"), "runs_dir": str(tmp_path / "p")}})
    run_experiment(probe, RunStore(tmp_path / "p"))
    (stage,) = (tmp_path / "probe" / "stages").glob("isolated-*.safetensors")
    lock = StageLock(tmp_path / "cache" / "stages" / stage.name).acquire()
    lines: list[str] = []
    released_by: list[str] = []

    def release(why: str) -> None:
        if not released_by:
            released_by.append(why)
            lock.release()

    def progress(line: str) -> None:
        lines.append(line)
        if sum("queued again" in x for x in lines) == 2:
            release("both cells yielded")  # the other "process" is done with it (stored nothing)

    # workers that waited on the lock instead would hold both slots until this timer: C
    # could not run and the callback above would never see two busy cells
    timer = threading.Timer(120, release, ("timeout",))
    timer.start()
    try:
        result = run_sweep(grid, tmp_path / "runs", num_cpus=2, progress=progress)
    finally:
        timer.cancel()
        release("end")
    assert released_by == ["both cells yielded"], lines
    assert not result.failed and len(result.records) == 3
    busy = [x for x in lines if "queued again" in x]
    assert len(busy) == 2 and {x.split("variant=")[1][0] for x in busy} == {"A", "B"}, lines
    by_variant = {c.values["variant"]: result.records[c.cell_id] for c in cells}
    assert sorted(by_variant[v].metrics["isolation"]["stage_hit"] for v in "AB") == [0.0, 1.0]


def test_a_busy_cell_leaves_no_half_run_behind(tmp_path, monkeypatch):
    """The worker side: told not to wait, a cell whose stage lock is taken returns
    ``busy`` and removes its run folder; told to wait, the same cell runs."""
    from abl import stages
    from abl.sweep import BUSY, run_cell

    base = {**BASE, "defense": {"name": "abl", "isolation_epochs": 2, "recovery_epochs": 1, "unlearning_epochs": 1,
                                "isolation_rate": 0.05, "cache_stages": True},
            "output": {"cache_dir": str(tmp_path / "cache")}}
    (cell,) = Grid("g", base, [("attack.rate", [0.1])]).cells(threads=1)
    real = stages.StageLock.acquire

    def taken(self, wait=True):
        if not wait:
            raise stages.StageBusy(self.path)
        return real(self, wait)

    monkeypatch.setattr(stages.StageLock, "acquire", taken)
    out = run_cell(cell.raw, cell.cell_id, {"grid": "g"}, str(tmp_path / "work"), wait_for_stages=False)
    assert out["status"] == BUSY and out["tar"] is None and "computing the stage" in out["message"]
    assert RunStore(tmp_path / "work").list_runs() == []
    out = run_cell(cell.raw, cell.cell_id, {"grid": "g"}, str(tmp_path / "work"), wait_for_stages=True)
    assert out["status"] == FINISHED
    assert stages._WAIT_FOR_STAGES  # the no-waiting switch is only on inside a cell


@pytest.mark.parametrize("name, cells", [("cifar10-attacks.yaml", 4), ("digits-attacks.yaml", 4)])
def test_the_example_grids_load_and_every_cell_validates(name, cells):
    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "grids" / name, seeds=3)
    assert len(grid.cells()) == 3 * cells


def test_a_worker_without_the_drivers_filesystem_still_delivers_its_run(tmp_path):
    """A worker on another machine cannot create the driver's work folder: it runs in its
    own temporary folder and the run arrives in the driver's store through the bytes it
    returns (here run_cell is called directly, as Ray would on that worker)."""
    from abl.sweep import run_cell

    grid = Grid("g", dict(BASE), [("attack.rate", [0.1])])
    (cell,) = grid.cells(threads=1)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # mkdir below a file fails, as on a machine without this path
    fallback = Path(tempfile.gettempdir()) / "abl-sweep" / cell.cell_id
    shutil.rmtree(fallback, ignore_errors=True)
    try:
        result = run_cell(cell.raw, cell.cell_id, {"grid": "g"}, str(blocker / "work"))
    finally:
        shutil.rmtree(fallback, ignore_errors=True)
    assert result["work_dir"] == str(fallback)
    assert result["status"] == FINISHED
    store = RunStore(tmp_path / "driver-runs")
    rec = ingest(store, result)
    assert rec is not None and rec.status == FINISHED and rec.run_id == result["run_id"]
    assert set(finished_cells(store)) == {cell.cell_id}
    assert (store.root / rec.run_id / "model.safetensors").is_file()
    assert ingest(store, result).run_id == rec.run_id and len(store.list_runs()) == 1  # a second delivery adds nothing


def test_a_run_whose_control_is_busy_stops_before_training(tmp_path):
    """The clean-model control is claimed before the run trains anything: a cell whose
    control another process is computing yields ("busy", its attempt dropped) without
    throwing away trained epochs (found in the threat matrix: a finished 31-epoch cell was
    dropped when its control turned out busy)."""
    from abl.experiment import run_experiment
    from abl.stages import StageBusy, StageLock, no_stage_waiting

    raw = {**BASE, "attack": {**BASE["attack"], "control": True}, "defense": {"name": "none", "epochs": 2},
           "train": {**BASE["train"], "threads": 1}}
    probe = build_experiment({**raw, "output": {"cache_dir": str(tmp_path / "probe"), "runs_dir": str(tmp_path / "p")}})
    run_experiment(probe, RunStore(tmp_path / "p"))
    (stage,) = (tmp_path / "probe" / "stages").glob("control-*.safetensors")
    lock = StageLock(tmp_path / "cache" / "stages" / stage.name).acquire()
    epochs: list[dict] = []
    try:
        exp = build_experiment({**raw, "output": {"cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "r")}})
        with pytest.raises(StageBusy), no_stage_waiting():
            run_experiment(exp, RunStore(tmp_path / "r"), on_epoch=epochs.append)
    finally:
        lock.release()
    assert epochs == [], "no epoch of the run was trained before the busy control was found"


def test_the_control_does_not_change_the_run(tmp_path):
    """Computing the control first leaves the run's own training as it is without it."""
    import torch

    from abl.experiment import run_experiment

    raw = {**BASE, "defense": {"name": "none", "epochs": 2}, "train": {**BASE["train"], "threads": 1}}
    runs = []
    for control in (False, True):
        exp = build_experiment({**raw, "attack": {**BASE["attack"], "control": control},
                                "output": {"cache_dir": str(tmp_path / f"c{control}"), "runs_dir": str(tmp_path / "r"),
                                           "save_model": True}})
        runs.append(run_experiment(exp, RunStore(tmp_path / "r")))
    a, b = (r.tensors("model") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "control_asr" in runs[1].final_metrics and "control_asr" not in runs[0].final_metrics

"""Experiment grids (``abl sweep``): a base experiment times axes times seeds, each cell one
``abl run`` executed as a Ray task.

A grid file is YAML::

    name: cifar-attacks
    base: cifar10-badnets-abl-default.yaml   # a config file (relative to the grid) or a mapping
    set: [train.threads=1]                    # overrides applied to every cell, last (optional)
    variants:                                 # optional: named sets of values, a first axis
      paper: {defense.preset: paper}
      ours: {defense.preset: default, defense.isolation_rate: 0.05}
    axes:                                     # their cartesian product, in this order
      attack: [badnets, blend]                # a component name: the base section's parameters
                                              # that the new component also takes are kept
      defense.isolation_rate: [0.01, 0.05]    # a dotted key: that value
    seeds: 3                                  # or a list [0, 1, 2]: the experiment seed (and the
                                              # attack's, which defaults to it)

Each cell has a stable id, the hash of its resolved config (every default filled in; the
``output`` section and the thread count left out, since they do not change what is
computed). The id is recorded with the run (``sweep.cell`` in its config), so rerunning the
same grid skips finished cells, resumes a cell a killed worker left behind in its work
folder (``abl resume`` semantics) and reruns the rest. Workers run into a work folder and
send the finished run folder back to the driver as bytes, so results land in the driver's
store even when the workers share no filesystem with it. Stages (the backdoored model, the
isolation result) are cached by content in ``output.cache_dir`` under a file lock, so cells
on one filesystem compute a shared stage once (see :mod:`abl.stages`). A cell that finds
its stage locked by another gives its worker back at once ("busy") and is queued again
behind the other cells, waiting on the lock only on its second attempt.

A driver killed with SIGKILL cannot shut its local Ray down, and Ray's agents outlive it;
the next ``abl sweep`` on the machine stops them (see :class:`RayProcessRecord`).

Ray (Moritz et al., OSDI 2018) is an optional dependency: ``pip install -e ".[sweep]"``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from abl.config import apply_overrides, load_yaml, set_path, to_plain
from abl.errors import AblError, ConfigError
from abl.store import FAILED, FINISHED, INTERRUPTED, RunRecord, RunStore, StoreError, _record_from_folder

#: a cell's status when it stopped because another cell is computing a stage it shares
BUSY = "busy"
GRID_KEYS = ("name", "base", "set", "axes", "variants", "seeds", "runs_dir")
COMPONENT_SECTIONS = ("dataset", "model", "attack", "defense")
WORK_DIR = ".sweep"  # under the runs folder; hidden, so the store never lists it as a run
RAY_HINT = 'abl sweep runs on Ray: install it with `pip install -e ".[sweep]"` (or `pip install "ray>=2.9"`)'
SUMMARY_METRICS = ("clean_acc", "asr", "iso_precision")


@dataclass(frozen=True)
class Cell:
    """One experiment of a grid: its axis values (and seed), its raw config and stable id."""

    cell_id: str
    values: dict[str, Any]
    raw: dict[str, Any]

    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.values.items()) or "(base)"

    def group(self) -> tuple[tuple[str, str], ...]:
        """The cell's axis values without the seed: the cells that differ only in seed."""
        return tuple((k, _short(v)) for k, v in self.values.items() if k != "seed")


@dataclass
class Grid:
    """A validated grid: base config, axes, seeds and fixed overrides."""

    name: str
    base: dict[str, Any]
    axes: list[tuple[str, list[Any]]] = field(default_factory=list)
    seeds: list[int] | None = None
    overrides: list[str] = field(default_factory=list)
    runs_dir: str | None = None
    #: named sets of values (dotted key -> value), a first axis called ``variant``: for grids
    #: whose cells differ in several keys at once (``abl reproduce``'s table rows)
    variants: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def cells(self, threads: int | None = None) -> list[Cell]:
        """Every cell, validated (a bad one raises ConfigError naming it). ``threads``: the
        torch threads each cell gets when its config leaves ``train.threads`` at 0."""
        from abl.experiment import build_experiment

        axes = ([("variant", [name for name, _ in self.variants])] if self.variants else []) + list(self.axes)
        axes += [("seed", list(self.seeds))] if self.seeds is not None else []
        by_name = dict(self.variants)
        out: list[Cell] = []
        seen: dict[str, str] = {}
        for combo in itertools.product(*[values for _, values in axes]):
            values = {key: value for (key, _), value in zip(axes, combo)}
            raw = copy.deepcopy(self.base)
            for key, value in values.items():
                if key == "variant" and self.variants:
                    for k, v in by_name[value].items():
                        _set_axis(raw, k, v)
                else:
                    _set_axis(raw, key, value)
            # last, so that `--set` wins over the grid's own values
            raw = apply_overrides(raw, list(self.overrides))
            if threads and not (raw.get("train") or {}).get("threads"):
                raw.setdefault("train", {})
                raw["train"] = {**raw["train"], "threads": int(threads)}
            label = ", ".join(f"{k}={_short(v)}" for k, v in values.items()) or "(base)"
            try:
                exp = build_experiment(copy.deepcopy(raw))
            except ConfigError as exc:
                raise ConfigError(f"grid '{self.name}', cell {label}: {exc}") from None
            cid = cell_id(exp.resolved())
            if cid in seen:
                raise ConfigError(f"grid '{self.name}': cells {seen[cid]} and {label} are the same experiment; "
                                  "remove the axis value that changes nothing")
            seen[cid] = label
            out.append(Cell(cid, values, raw))
        return out


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        name = value.get("name")
        rest = {k: v for k, v in value.items() if k != "name"}
        return f"{name}{json.dumps(to_plain(rest), sort_keys=True, separators=(',', ':'))}" if rest else str(name)
    return "none" if value is None else str(value)


def _set_axis(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set one axis value in a raw config. A component name for a component section keeps
    the base section's parameters that the new component also takes."""
    path = [p for p in key.split(".") if p]
    value = copy.deepcopy(value)
    if len(path) == 1 and path[0] in COMPONENT_SECTIONS and isinstance(value, str) and value != "none":
        from abl.registries import all_registries
        from abl.registry import describe

        registry = all_registries()[path[0]]
        if value not in registry.names():
            raise ConfigError(f"axis '{key}': unknown {path[0]} '{value}'; choose from {', '.join(registry.names())}")
        base = raw.get(path[0])
        params = {p.name for p in describe(registry.get(value))}
        kept = {k: v for k, v in base.items() if k in params} if isinstance(base, dict) else {}
        raw[path[0]] = {**kept, "name": value}
        return
    set_path(raw, path, value, f"axis '{key}'")


#: config keys that do not change what a run computes, left out of the cell id
_ID_IGNORED_TRAIN = ("threads", "checkpoint", "checkpoint_every_s")


def cell_id(resolved: Mapping[str, Any]) -> str:
    """The stable id of an experiment: a hash of its resolved config without ``output`` and
    the thread/checkpoint settings."""
    plain = {k: v for k, v in to_plain(dict(resolved)).items() if k not in ("output", "device", "threads_used", "sweep")}
    plain["train"] = {k: v for k, v in (plain.get("train") or {}).items() if k not in _ID_IGNORED_TRAIN}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_grid(path: str | Path, seeds: int | None = None, overrides: list[str] | None = None) -> Grid:
    """Read and validate a grid file. ``seeds`` (``--seeds N``) replaces the file's seeds
    with 0..N-1; ``overrides`` are added to its ``set``."""
    from abl.experiment import resolve_input_paths

    path = Path(path)
    raw = load_yaml(path)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"grid {path}: unknown key '{unknown[0]}'; valid keys: {', '.join(GRID_KEYS)}")
    here = path.absolute().parent
    base = raw.get("base")
    if isinstance(base, str):
        base_path = (here / base) if not Path(base).expanduser().is_absolute() else Path(base).expanduser()
        if not base_path.is_file():
            raise ConfigError(f"grid {path}: base config '{base}' not found (looked at {base_path})")
        base = resolve_input_paths(load_yaml(base_path), base_path.absolute().parent)
    elif isinstance(base, dict):
        base = resolve_input_paths(base, here)
    else:
        raise ConfigError(f"grid {path}: 'base' must be a config file path or a mapping, got {base!r}")
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"grid {path}: 'axes' must map a config key to a list of values")
    axes: list[tuple[str, list[Any]]] = []
    for key, values in axes_raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid {path}: axis '{key}' must be a non-empty list of values, got {values!r}")
        if key == "seed":
            raise ConfigError(f"grid {path}: give seeds with 'seeds: N' (or a list), not as an axis")
        axes.append((str(key), values))
    variants_raw = raw.get("variants") or {}
    if not isinstance(variants_raw, dict) or not all(isinstance(v, dict) and v for v in variants_raw.values()):
        raise ConfigError(f"grid {path}: 'variants' must map a name to a mapping of config keys to values")
    variants = [(str(k), dict(v)) for k, v in variants_raw.items()]
    seed_list = _seed_list(raw.get("seeds"), f"grid {path}: 'seeds'")
    if seeds is not None:
        seed_list = _seed_list(seeds, "--seeds")
    fixed = raw.get("set") or []
    if not isinstance(fixed, list) or not all(isinstance(s, str) for s in fixed):
        raise ConfigError(f"grid {path}: 'set' must be a list of 'key=value' strings")
    name = raw.get("name") or path.stem
    runs_dir = raw.get("runs_dir")
    if runs_dir is not None and not Path(str(runs_dir)).expanduser().is_absolute():
        runs_dir = str(here / str(runs_dir))
    return Grid(str(name), base, axes, seed_list, list(fixed) + list(overrides or []), runs_dir, variants)


def _seed_list(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where} must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where} repeats a seed: {value}")
        return list(value)
    raise ConfigError(f"{where} must be a count or a list of integers, got {value!r}")


# ----------------------------------------------------------------------------- the worker side


def _pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def _cell_of(rec: RunRecord) -> str | None:
    try:
        sweep = rec.config.get("sweep")
    except Exception:  # noqa: BLE001 - an unreadable config is not this cell's run
        return None
    return sweep.get("cell") if isinstance(sweep, dict) else None


def run_cell(raw: dict[str, Any], cell: str, sweep_info: dict[str, Any], work_dir: str,
             wait_for_stages: bool = True) -> dict[str, Any]:
    """Run one cell into its work folder (a Ray task; also callable directly) and return the
    run folder packed as tar bytes with its status.

    A finished run already in the work folder is sent again (the driver died before it was
    received); an interrupted one (its worker was killed) is resumed from its checkpoint.
    With ``wait_for_stages=False``, a cell whose shared stage another run is computing stops
    at once with status ``busy`` (its partial run folder removed) instead of holding its
    worker idle until the stage is there.
    """
    from abl.experiment import build_experiment, resume_experiment, run_experiment
    from abl.stages import StageBusy, no_stage_waiting

    work = Path(work_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError:  # a worker on a machine without the driver's filesystem
        work = Path(tempfile.gettempdir()) / "abl-sweep" / cell
        work.mkdir(parents=True, exist_ok=True)
    store = RunStore(work)
    mine = [r for r in store.list_runs() if _cell_of(r) == cell]
    status, message, resumed = FINISHED, None, False
    t0 = time.perf_counter()
    rec = next((r for r in mine if r.status == FINISHED), None)
    try:
        if rec is None:
            interrupted = next((r for r in mine if r.status == INTERRUPTED), None)
            with no_stage_waiting(not wait_for_stages):
                if interrupted is not None:
                    resumed = True
                    rec = resume_experiment(interrupted.run_id, store)
                else:
                    exp = build_experiment(copy.deepcopy(raw))
                    exp.output.runs_dir = str(work)
                    rec = run_experiment(exp, store, sweep={**sweep_info, "cell": cell})
    except StageBusy as exc:
        # nothing was trained yet (a stage is claimed before its training): drop the attempt
        for r in store.list_runs():
            if _cell_of(r) == cell and r.status != FINISHED:
                shutil.rmtree(r.path, ignore_errors=True)
        return {"cell": cell, "status": BUSY, "message": str(exc), "resumed": resumed, "run_id": None, "tar": None,
                "host": socket.gethostname(), "work_dir": str(work), "wall_s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - reported to the driver with the failed run folder
        status, message = FAILED, f"{type(exc).__name__}: {exc}"
        failed = [r for r in store.list_runs() if _cell_of(r) == cell and r.status == FAILED]
        rec = failed[0] if failed else None
    return {
        "cell": cell, "status": status, "message": message, "resumed": resumed,
        "run_id": rec.run_id if rec is not None else None,
        "tar": _pack(rec.path) if rec is not None else None,
        "host": socket.gethostname(), "work_dir": str(work), "wall_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- the driver side


def _safe_extract(data: bytes, dest: Path, run_id: str) -> None:
    """Unpack a worker's run folder; only plain files and folders under ``run_id/``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if Path(m.name).is_absolute() or ".." in parts or not parts or parts[0] != run_id or not (m.isfile() or m.isdir()):
                raise AblError(f"a sweep worker sent an unexpected archive entry '{m.name}'; nothing was stored")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - the members were checked above
            tar.extractall(dest)


def ingest(store: RunStore, result: Mapping[str, Any], index: "CellIndex | None" = None) -> RunRecord | None:
    """Put a worker's run folder into the driver's store (atomically: unpacked beside it,
    then renamed). A cell that already has a finished run in the store is not added twice.

    ``index`` (the driver's :class:`CellIndex`) makes the duplicate check read only the run
    folders that appeared since the last cell, not every config in the store."""
    run_id, data = result.get("run_id"), result.get("tar")
    if not run_id or data is None:
        return None
    dest = store.root / run_id
    if dest.exists():
        return store.get(run_id)
    if result["status"] == FINISHED:
        earlier = (index or CellIndex(store)).refresh().get(result["cell"])
        if earlier is not None:  # another driver stored this cell meanwhile: keep that run
            return earlier
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store.root))
    try:
        _safe_extract(data, tmp, run_id)
        os.replace(tmp / run_id, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store.add_folder(run_id)


class CellIndex:
    """Cell id -> finished sweep run in a store, kept up to date incrementally.

    A refresh lists the store's folders (cheap) and reads the config of only those it has
    not settled yet: a finished or failed run is read once; a running or interrupted one is
    looked at again, since it may finish. A grid of N cells thus reads O(N) configs, where
    rescanning the store after every cell read O(N^2).
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.cells: dict[str, RunRecord] = {}
        self._settled: set[str] = set()

    def refresh(self) -> dict[str, RunRecord]:
        root = self.store.root
        if not root.is_dir():
            return self.cells
        for folder in sorted(root.iterdir()):
            name = folder.name
            if name in self._settled or name.startswith(".") or not (folder / "meta.json").is_file():
                continue
            try:
                rec = _record_from_folder(folder)
            except StoreError:
                continue
            if rec.status in (FINISHED, FAILED):
                self._settled.add(name)
            if rec.status == FINISHED:
                cid = _cell_of(rec)
                if cid is not None:
                    self.cells.setdefault(cid, rec)
        return self.cells


def finished_cells(store: RunStore) -> dict[str, RunRecord]:
    """Cell id -> its finished run, for every finished sweep run in the store."""
    return dict(CellIndex(store).refresh())


# ----------------------------------------------------------------------------- leftover Ray processes

#: where each live sweep driver lists the processes of the local Ray it started
REAPER_DIR = Path(tempfile.gettempdir()) / f"abl-ray-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
_REFRESH_S = 2.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of a live process from ``/proc`` (None: gone or a zombie).
    The start time (clock ticks since boot) tells a process from a later one with its pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name, in parentheses, may hold spaces
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[19]


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Every live process below ``pid`` (children, theirs, ...), as ``(pid, start time)``."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry), st[1]))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child[0])
    return out


class RayProcessRecord:
    """The processes of the local Ray a sweep driver started, listed in :data:`REAPER_DIR`.

    Ray's head processes die with a driver killed by SIGKILL, but the raylet's agents
    (``DashboardAgent``, ``RuntimeEnvAgent``) outlive it and ignore SIGTERM. So the driver
    keeps a list of every process below it (refreshed every few seconds: workers come and
    go) and removes the list when it ends; the next ``abl sweep`` (:func:`reap_leftover_ray`)
    SIGKILLs the processes of any list whose driver is gone.
    """

    def __init__(self, directory: Path = REAPER_DIR) -> None:
        me = _proc_stat(os.getpid())
        self.enabled = me is not None  # /proc: Linux
        self.path = directory / f"{os.getpid()}.json"
        self._driver = [os.getpid(), me[1] if me else ""]
        # made before Ray starts: the children the driver already had are not Ray's
        self._before = set(_descendants(os.getpid())) if self.enabled else set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        procs = [p for p in _descendants(os.getpid()) if p not in self._before]
        data = {"driver": self._driver, "boot": _boot_id(), "procs": procs}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.write()
        except OSError:  # no writable temp folder: nothing to clean up after, but the sweep runs
            self.enabled = False
            return
        self._thread = threading.Thread(target=self._refresh, name="abl-ray-record", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(_REFRESH_S):
            try:
                self.write()
            except OSError:
                pass

    def stop(self) -> None:
        """After Ray has shut down: the list is no longer needed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled:
            for p in (self.path, self.path.with_suffix(".tmp")):
                try:
                    p.unlink()
                except OSError:
                    pass


def reap_leftover_ray(directory: Path = REAPER_DIR) -> list[int]:
    """SIGKILL the Ray processes of sweep drivers that died without shutting Ray down
    (``kill -9``, a crash); returns their pids. A live driver's processes are left alone,
    and a pid is killed only while it is the same process (same start time, same boot)."""
    import signal

    killed: list[int] = []
    if not directory.is_dir():
        return killed
    boot = _boot_id()
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            driver_pid, driver_start = int(data["driver"][0]), str(data["driver"][1])
            procs = [(int(p), str(t)) for p, t in data["procs"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # being written, or not ours
        same_boot = data.get("boot") == boot
        driver = _proc_stat(driver_pid)
        if same_boot and driver is not None and driver[1] == driver_start:
            continue  # its driver is alive: a sweep running beside this one
        if same_boot:
            for pid, start in procs:
                st = _proc_stat(pid)
                if st is not None and st[1] == start:
                    try:
                        os.kill(pid, signal.SIGKILL)  # the agents ignore SIGTERM
                        killed.append(pid)
                    except OSError:
                        pass
        try:
            path.unlink()
        except OSError:
            pass
    return killed


def _import_ray():
    try:
        import ray
    except ImportError:
        raise AblError(RAY_HINT) from None
    return ray


@dataclass
class SweepResult:
    grid: Grid
    cells: list[Cell]
    records: dict[str, RunRecord]  # cell id -> finished run
    skipped: int
    failed: dict[str, str]  # cell id -> message
    wall_s: float


_LABEL = {"clean_acc": "CA", "asr": "ASR", "iso_precision": "isolation precision"}


def _slots(resources: Mapping[str, float], cpus: float, gpus: float) -> int:
    """How many cells the cluster runs at once (so "running" in the progress is true)."""
    counts = [int(resources.get("CPU", 0) // cpus)] if cpus > 0 else []
    if gpus > 0:
        counts.append(int(resources.get("GPU", 0) // gpus))
    return max(1, min(counts)) if counts else 0


def check_gpu_share(resources: Mapping[str, float], gpus_per_run: float, cells: list[Cell]) -> None:
    """Refuse a sweep that would train on the CPU of a cluster with GPUs: Ray hides the
    GPUs from a task that asks for none, so with ``--gpus-per-run 0`` every cell whose
    ``train.device`` is not ``cpu`` would fall back to the CPU without a word. A grid that
    sets ``train.device: cpu`` trains there on purpose and runs."""
    gpus = float(resources.get("GPU", 0) or 0)
    if gpus <= 0 or gpus_per_run > 0:
        return
    on_gpu = [c for c in cells if str((c.raw.get("train") or {}).get("device", "auto")) != "cpu"]
    if on_gpu:
        raise AblError(
            f"the Ray cluster has {gpus:g} GPU{'' if gpus == 1 else 's'} but --gpus-per-run is 0, so Ray would hide "
            f"them and {len(on_gpu)} cell{'' if len(on_gpu) == 1 else 's'} would train on the CPU; give each cell a "
            "share (--gpus-per-run 1, or 0.25 for four small runs per GPU) or train on the CPU on purpose with "
            "--set train.device=cpu"
        )


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def collect_sweep(grid: Grid, runs_dir: str | Path, cpus_per_run: float = 1) -> SweepResult:
    """The cells of ``grid`` already finished in the store at ``runs_dir``, running nothing
    and starting no Ray: the table of a grid run in parts (``abl reproduce --table-only``).
    Cells not finished are neither in ``records`` nor in ``failed``."""
    if not Path(runs_dir).is_dir():
        raise AblError(f"runs folder '{runs_dir}' does not exist: run the grid first, or point --runs-dir at its runs")
    cells = grid.cells(threads=max(1, int(cpus_per_run)))
    done = dict(CellIndex(RunStore(runs_dir)).refresh())
    records = {c.cell_id: done[c.cell_id] for c in cells if c.cell_id in done}
    return SweepResult(grid, cells, records, len(records), {}, 0.0)


def run_sweep(
    grid: Grid,
    runs_dir: str | Path,
    *,
    address: str | None = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
    num_cpus: int | None = None,
    max_concurrent: int | None = None,
    progress: Callable[[str], None] = print,
) -> SweepResult:
    """Run every unfinished cell of ``grid`` on Ray (a local Ray started on demand, or the
    cluster at ``address``) and collect the runs in the store at ``runs_dir``."""
    from abl.experiment import check_runs_dir

    t0 = time.perf_counter()
    threads = max(1, int(cpus_per_run))  # a fractional CPU share still gets one thread
    cells = grid.cells(threads=threads)
    check_runs_dir(runs_dir)  # before any cell trains: the runs are gathered there at the end
    store = RunStore(runs_dir)
    index = CellIndex(store)
    done = dict(index.refresh())
    records = {c.cell_id: done[c.cell_id] for c in cells if c.cell_id in done}
    pending = [c for c in cells if c.cell_id not in done]
    total = len(cells)
    progress(f"grid '{grid.name}': {total} cells, {len(records)} already finished, {len(pending)} to run")
    leftover = reap_leftover_ray()
    if leftover:
        progress(f"stopped {len(leftover)} Ray processes left running by a sweep that was killed")
    failed: dict[str, str] = {}
    if pending:
        # no usage reports from a machine that may have no internet (Ray's own switch)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray = _import_ray()
        started = not ray.is_initialized()
        record = RayProcessRecord() if started and address is None else None
        if started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address is None:
                # "local": a new Ray of our own, never a cluster some other process left running
                kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                              object_store_memory=256 * 1024**2)
            else:
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - ConnectionError and Ray's own types
                raise AblError(f"could not start or reach Ray ({'address ' + address if address else 'local'}): "
                               f"{exc}") from None
            if record is not None:
                record.start()
        try:
            resources = ray.cluster_resources()
            check_gpu_share(resources, gpus_per_run, pending)
            # max_calls=1 on a GPU: a fresh worker per cell, so no CUDA context (and its
            # memory) outlives its cell in a reused worker bound to another GPU; CPU cells
            # keep reusing workers (no context to leak, and torch imports once per worker).
            # In ray.remote itself: Ray ignores max_calls given to .options()
            task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0,
                              max_calls=1 if gpus_per_run > 0 else 0)(run_cell)
            work_root = (Path(runs_dir) / WORK_DIR).absolute()
            info = {"grid": grid.name}
            limit = max_concurrent or _slots(resources, cpus_per_run, gpus_per_run) or len(pending)
            queue = list(pending)
            inflight: dict[Any, tuple[Cell, float]] = {}
            durations: list[float] = []
            # A cell whose shared stage (backdoored model, isolation) another cell is
            # computing would wait on its lock with its CPU/GPU share idle. Its first
            # attempt does not wait: it comes back "busy" and goes to the end of the queue,
            # so the slot runs other cells meanwhile; its second attempt waits (by then the
            # stage is usually there, and nothing else is left to run before it).
            deferred: set[str] = set()
            while queue or inflight:
                while queue and len(inflight) < limit:
                    cell = queue.pop(0)
                    ref = task.remote(cell.raw, cell.cell_id, {**info, "values": {k: _short(v) for k, v in cell.values.items()}},
                                      str(work_root / cell.cell_id), cell.cell_id in deferred)
                    inflight[ref] = (cell, time.perf_counter())
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    cell, start = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a worker that died: the cell fails, the grid goes on
                        result = {"cell": cell.cell_id, "status": FAILED, "message": f"worker lost: {exc}", "run_id": None}
                    if result["status"] == BUSY:
                        deferred.add(cell.cell_id)
                        queue.append(cell)
                        progress(f"[{len(records)}/{total} done] {cell.label()}: its shared stage is being computed by "
                                 "another cell; queued again behind the others")
                        continue
                    rec = ingest(store, result, index)
                    shutil.rmtree(work_root / cell.cell_id, ignore_errors=True)
                    if result["status"] == FINISHED and rec is not None:
                        records[cell.cell_id] = rec
                        durations.append(time.perf_counter() - start)
                        m = rec.final_metrics
                        figures = ", ".join(f"{_LABEL[k]} {100 * m[k]:.1f}%" for k in SUMMARY_METRICS if isinstance(m.get(k), float)
                                            and not math.isnan(m[k]))
                        what = f"finished in {time.perf_counter() - start:.0f} s" + (" (resumed)" if result.get("resumed") else "")
                        what += f": {figures}" if figures else ""
                    else:
                        failed[cell.cell_id] = result.get("message") or "failed"
                        what = f"FAILED: {failed[cell.cell_id]}"
                    remaining = len(queue) + len(inflight)
                    eta = ""
                    if durations and remaining:
                        eta = f", ETA {_fmt_eta(sum(durations) / len(durations) * math.ceil(remaining / max(1, min(limit, remaining))))}"
                    running = min(limit, len(inflight) + len(queue))  # after the queue refills the free slot
                    progress(f"[{len(records)}/{total} done, {running} running, {len(failed)} failed{eta}] "
                             f"{cell.label()}: {what}")
        finally:
            if started:
                ray.shutdown()
            if record is not None:
                record.stop()
    return SweepResult(grid, cells, records, total - len(pending), failed, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- tables


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def group_stats(cells: list[Cell], records: Mapping[str, RunRecord],
                metrics: tuple[str, ...] = SUMMARY_METRICS) -> list[dict[str, Any]]:
    """One row per group of cells that differ only in seed: the axis values, the number of
    finished seeds, and per metric (mean, standard deviation, min, max) in percent."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.group(), []).append(c)
    rows = []
    for key, members in groups.items():
        recs = [records[c.cell_id] for c in members if c.cell_id in records]
        row: dict[str, Any] = {"axes": dict(key), "seeds": len(recs), "cells": len(members)}
        for m in metrics:
            vals = [100 * float(r.final_metrics[m]) for r in recs
                    if isinstance(r.final_metrics.get(m), (int, float)) and not math.isnan(float(r.final_metrics[m]))]
            if vals:
                mean, sd = _stats(vals)
                row[m] = {"mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}
        rows.append(row)
    return rows


def fmt_stat(stat: Mapping[str, float] | None, with_n: bool = False, unit: str = "") -> str:
    """``mean ± sd`` over seeds (one seed: the value; none: a dash); ``unit`` follows the
    mean (``%``: the sweep table's rates, in points)."""
    if stat is None:
        return "–"
    if stat["n"] <= 1:
        return f"{stat['mean']:.2f}{unit}"
    return f"{stat['mean']:.2f}{unit} ± {stat['sd']:.2f}" + (f" (n={int(stat['n'])})" if with_n else "")


def disagreement(row: Mapping[str, Any], threshold: float) -> list[str]:
    """The metrics whose seeds are further apart than ``threshold`` points (max - min)."""
    return [m for m in SUMMARY_METRICS if isinstance(row.get(m), dict) and row[m]["n"] > 1
            and row[m]["max"] - row[m]["min"] > threshold]


def sweep_table(result_cells: list[Cell], records: Mapping[str, RunRecord], axes: list[str] | None = None,
                disagree: float = 10.0) -> str:
    """A Markdown table of a grid: mean ± sd over seeds (n), flagged where seeds disagree
    by more than ``disagree`` points. ``axes``: the columns (default: every axis of the
    cells, ``variant`` included, seed left out)."""
    from abl.report import METRIC_LABELS

    if axes is None:
        axes = [k for k in (result_cells[0].values if result_cells else {}) if k != "seed"]

    rows = group_stats(result_cells, records)
    metrics = [m for m in SUMMARY_METRICS if any(m in r for r in rows)]
    header = list(axes) + ["seeds"] + [METRIC_LABELS.get(m, m) for m in metrics] + ["seeds disagree"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["axes"].get(a, "") for a in axes] + [f"{r['seeds']}/{r['cells']}"]
        for m in metrics:
            cells.append(fmt_stat(r.get(m), unit="%"))  # every summary metric is a rate
        flagged = disagreement(r, disagree)
        cells.append(", ".join(f"**{METRIC_LABELS.get(m, m)} {r[m]['min']:.2f}%–{r[m]['max']:.2f}%**" for m in flagged))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

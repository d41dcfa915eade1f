"""The results store: one folder per run, plus an SQLite index that can always be rebuilt.

A store is a root folder (``runs/`` by default) holding::

    runs/
      index.sqlite                         # a cache of what the folders say; rebuilt if lost
      20261126-043512-badnets-abl-3f9a/
        config.yaml                        # the resolved config the run was given
        meta.json                          # ids, status, times, versions, code revision
        history.jsonl                      # one JSON line per logged epoch
        metrics.json                       # numbers only, per phase; written at finish
        *.npy, *.safetensors               # arrays (allow_pickle=False) and tensors

The folders are the source of truth. A run is *finished* only when ``meta.json`` says so
**and** ``metrics.json`` exists; both are written through a temp file and ``os.replace``
(metrics first), so a crash never leaves a run that looks finished. A writer that is
dropped without :meth:`RunWriter.finish` leaves its run ``"running"``.

Records are immutable once finished: a :class:`RunWriter` refuses further writes after
``finish``/``fail``. Reports (``abl.report``) read only from here.

Non-finite numbers are stored as JSON ``null`` (standard JSON, readable by any tool) and
read back as ``nan``; metrics may be ``nan`` (an undefined rate) but never infinite.

Example::

    store = RunStore("runs")
    with store.create_run(config, name="badnets-abl", seed=0) as run:
        run.log_epoch({"phase": "isolation", "epoch": 0, "loss": 0.42, "clean_acc": 0.81})
        run.save_array("poison_mask", mask)
        run.finish({"final": {"clean_acc": 0.93, "asr": 0.01}}, wall_s=812.4)
    store.get(run.run_id[:15]).final_metrics
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import secrets
import socket
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import abl
from abl.errors import StoreError

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)
#: a run on another host with no sign of life (``heartbeat`` file) for this long is shown
#: interrupted; on its own host, the run's process being gone decides at once.
STALE_S = 3600.0
HEARTBEAT = "heartbeat"

INDEX_NAME = "index.sqlite"
_SCHEMA_VERSION = 1
_SQLITE_TIMEOUT_S = 30.0
_COMPONENTS = ("dataset", "model", "attack", "defense")
_ARTEFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The folder whose git checkout is recorded as the code revision (tests monkeypatch it).
_CODE_DIR = Path(abl.__file__).resolve().parent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id   TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    status   TEXT NOT NULL,
    started  TEXT NOT NULL,
    finished TEXT,
    wall_s   REAL,
    seed     INTEGER,
    dataset  TEXT,
    model    TEXT,
    attack   TEXT,
    defense  TEXT,
    metrics  TEXT NOT NULL,
    path     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
"""
_COLUMNS = ("run_id", "name", "status", "started", "finished", "wall_s", "seed",
            *_COMPONENTS, "metrics", "path")


# ----------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug or "run"


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None, recursively, so that files stay standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _nan_for_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in d.items()}


def _decode_metrics(data: Any) -> dict[str, dict[str, float]]:
    if not isinstance(data, dict):
        return {}
    return {phase: _nan_for_none(vals) for phase, vals in data.items() if isinstance(vals, dict)}


def _atomic_write_bytes(path: Path, write) -> None:
    """Write ``path`` through a temp file beside it and ``os.replace``: all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def _as_scalar(value: Any) -> Any:
    """numpy scalars and 0-d tensors -> Python numbers; anything else unchanged."""
    if not isinstance(value, (str, bytes, int, float)) and hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # arrays with more than one element
            return value
    return value


def _check_metric(value: Any, where: str) -> float | int:
    value = _as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric '{where}' must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(f"metric '{where}' must be finite or nan, got {value!r}")
    return value


def validate_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Check ``{phase: {name: number}}``: numbers only (never strings), finite or nan."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping phase -> {{name: number}}, got {type(metrics).__name__}")
    out: dict[str, dict[str, float | int]] = {}
    for phase, values in metrics.items():
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"metric phase names must be non-empty strings, got {phase!r}")
        if not isinstance(values, Mapping):
            raise ValueError(f"metrics['{phase}'] must be a mapping name -> number, got {values!r}")
        out[phase] = {}
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names in '{phase}' must be non-empty strings, got {name!r}")
            out[phase][name] = _check_metric(value, f"{phase}.{name}")
    return out


def _check_artefact_name(name: str) -> None:
    if not isinstance(name, str) or not _ARTEFACT_NAME.match(name):
        raise ValueError(f"artefact name {name!r} must be letters, digits, '_', '.', '-' (no path)")


def _component(config: Mapping[str, Any], key: str) -> str | None:
    section = config.get(key)
    if isinstance(section, str):
        return section
    if isinstance(section, Mapping) and isinstance(section.get("name"), str):
        return section["name"]
    return None


def _device(config: Mapping[str, Any]) -> str | None:
    if config.get("device") is not None:
        return str(config["device"])
    for section in config.values():
        if isinstance(section, Mapping) and section.get("device") is not None:
            return str(section["device"])
    return None


def code_revision(path: Path | None = None) -> dict[str, Any] | None:
    """``{"revision": <HEAD sha>, "dirty": bool}`` of the git checkout holding ``path``.

    ``path`` defaults to the ``abl`` package folder. None when it is not a git checkout
    or git is not installed: recording provenance never fails a run. ``dirty`` counts
    changes to tracked files only.
    """
    where = str(path if path is not None else _CODE_DIR)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take the repo's index.lock

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True,
                                 timeout=10, env=env, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    if not revision:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def _environment() -> dict[str, Any]:
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = None
    return {
        "abl_version": abl.__version__,
        "git": code_revision(),
        "torch_version": torch_version,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class RunRecord:
    """One run as stored. ``config`` and ``meta`` are read from the folder on first use.

    ``metrics`` is empty unless the run finished; ``final_metrics`` is ``metrics["final"]``.
    """

    run_id: str
    name: str
    status: str
    path: Path
    started: str
    finished: str | None
    wall_s: float | None
    metrics: dict[str, dict[str, float]]
    seed: int | None = None
    dataset: str | None = None
    model: str | None = None
    attack: str | None = None
    defense: str | None = None

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was given (``config.yaml``)."""
        try:
            data = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"run {self.run_id} has no config.yaml in {self.path}: the folder is incomplete") from None
        except yaml.YAMLError as exc:
            raise StoreError(f"run {self.run_id}: config.yaml is not valid YAML ({str(exc).splitlines()[0]})") from None
        return data if isinstance(data, dict) else {}

    @cached_property
    def meta(self) -> dict[str, Any]:
        """``meta.json``: seed, times, versions, code revision, host, failure message."""
        return _read_meta(self.path)

    @property
    def message(self) -> str | None:
        """Why the run failed (None otherwise)."""
        return self.meta.get("message")

    @property
    def final_metrics(self) -> dict[str, float]:
        """``metrics["final"]``; empty when the run did not finish."""
        return dict(self.metrics.get("final", {}))

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records in the order logged (``null`` read back as ``nan``).

        A torn last line (the process died mid-write) is ignored.
        """
        path = self.path / "history.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise StoreError(f"run {self.run_id}: history.jsonl line {i + 1} is not valid JSON") from None
            out.append(_nan_for_none(rec))
        return out

    def artefacts(self, ext: str = "npy") -> list[str]:
        """Names of the stored arrays (``ext="npy"``) or tensor files (``"safetensors"``)."""
        suffix = "." + ext
        return sorted(p.name[: -len(suffix)] for p in self.path.glob("*" + suffix) if not p.name.startswith("."))

    def json(self, name: str) -> Any:
        """The data saved as ``<name>.json`` (``null`` numbers stay None)."""
        _check_artefact_name(name)
        path = self.path / f"{name}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"run {self.run_id} has no '{name}.json'") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"run {self.run_id}: {name}.json is not valid JSON ({exc})") from None

    def has_array(self, name: str) -> bool:
        return (self.path / f"{name}.npy").is_file()

    def array(self, name: str) -> np.ndarray:
        """The array saved as ``<name>.npy`` (never unpickled)."""
        _check_artefact_name(name)
        path = self.path / f"{name}.npy"
        if not path.is_file():
            known = ", ".join(self.artefacts("npy")) or "none"
            raise StoreError(f"run {self.run_id} has no array '{name}' (arrays: {known})")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise StoreError(f"run {self.run_id}: {path.name} is unreadable ({exc})") from None

    def tensors(self, name: str) -> dict[str, Any]:
        """The tensors saved as ``<name>.safetensors``, on the CPU."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_artefact_name(name)
        path = self.path / f"{name}.safetensors"
        if not path.is_file():
            known = ", ".join(self.artefacts("safetensors")) or "none"
            raise StoreError(f"run {self.run_id} has no tensors '{name}' (tensor files: {known})")
        try:
            return load_file(path, device="cpu")
        except SafetensorError as exc:
            raise StoreError(f"run {self.run_id}: {path.name} is unreadable ({exc})") from None


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{folder} has no meta.json: it is not a run folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{folder}/meta.json is not valid JSON ({exc}): restore or delete the folder") from None
    if not isinstance(meta, dict) or "run_id" not in meta:
        raise StoreError(f"{folder}/meta.json does not describe a run: restore or delete the folder")
    return meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _liveness(folder: Path, meta: dict[str, Any]) -> str | None:
    """Why a run whose folder says ``running`` is in fact dead, or None if it may be alive.

    Same host: its recorded process is gone (``kill -9``, a crash, a reboot). Another host:
    its heartbeat (touched at start and after every epoch) is older than :data:`STALE_S`.
    """
    pid = meta.get("pid")
    if meta.get("hostname") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        return None if _pid_alive(pid) else f"its process (pid {pid}) is gone"
    try:
        age = time.time() - (folder / HEARTBEAT).stat().st_mtime
    except FileNotFoundError:
        return None
    return f"no sign of life for {age / 3600:.1f} h" if age > STALE_S else None


def _record_from_folder(folder: Path) -> RunRecord:
    """Read a run from its folder (the source of truth)."""
    meta = _read_meta(folder)
    status = meta.get("status", RUNNING)
    if status == RUNNING:
        dead = _liveness(folder, meta)
        if dead is not None:
            status = INTERRUPTED
            meta["message"] = f"interrupted: {dead}"
    metrics: dict[str, dict[str, float]] = {}
    if status == FINISHED:
        try:
            metrics = _decode_metrics(json.loads((folder / "metrics.json").read_text(encoding="utf-8")))
        except FileNotFoundError:
            status = FAILED
            meta["message"] = "meta.json says finished but metrics.json is missing"
        except json.JSONDecodeError:
            status = FAILED
            meta["message"] = "metrics.json is not valid JSON"
    elif status not in STATUSES:
        meta["message"] = f"meta.json has an unknown status {status!r}"
        status = FAILED
    if meta["run_id"] != folder.name:
        # the folder name is the id: a planted id ("../..") must not steer paths built from it
        meta["message"] = f"meta.json names run id {str(meta['run_id'])[:80]!r}; the folder name {folder.name!r} is used"
        meta["run_id"] = folder.name
    comps = meta.get("components") or {}
    rec = RunRecord(
        run_id=folder.name, name=str(meta.get("name", folder.name)), status=status, path=folder,
        started=meta.get("started", ""), finished=meta.get("finished"), wall_s=meta.get("wall_s"),
        metrics=metrics, seed=meta.get("seed"),
        **{c: comps.get(c) for c in _COMPONENTS},
    )
    rec.__dict__["meta"] = meta  # already read: prime the cached property
    return rec


def _row_of(rec: RunRecord, root: Path) -> tuple:
    try:
        rel = str(rec.path.relative_to(root))
    except ValueError:
        rel = str(rec.path)
    return (rec.run_id, rec.name, rec.status, rec.started, rec.finished, rec.wall_s, rec.seed,
            rec.dataset, rec.model, rec.attack, rec.defense,
            json.dumps(_json_safe(rec.metrics)), rel)


# ----------------------------------------------------------------------------- store


class _IndexBroken(Exception):
    pass


class RunStore:
    """A results root: run folders plus ``index.sqlite``. Safe for several writer processes."""

    def __init__(self, root: str | Path = "runs") -> None:
        self.root = Path(root)
        self.index_path = self.root / INDEX_NAME

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # -- writing

    def create_run(self, config: Mapping[str, Any], *, name: str, seed: int) -> "RunWriter":
        """Start a run: make its folder, save the config and meta, index it as running."""
        from abl.config import to_plain

        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"run name must be a non-empty string, got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        config = to_plain(config)
        if not isinstance(config, dict):
            raise ValueError(f"config must be a mapping, got {type(config).__name__}")
        try:
            config_text = yaml.safe_dump(config, sort_keys=False)
        except yaml.YAMLError as exc:
            raise ValueError(f"config is not plain YAML data: {exc}") from None

        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"results root '{self.root}' is a file, not a folder: pick another path")
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_index_path()  # before a run folder exists that no index could list
        started = _now()
        for _ in range(100):
            run_id = f"{started:%Y%m%d-%H%M%S}-{_slug(name)}-{secrets.token_hex(2)}"
            folder = self.root / run_id
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 16 random bits
            raise StoreError(f"could not allocate a unique run folder in '{self.root}'")

        meta = {
            "run_id": run_id, "name": name, "seed": seed, "status": RUNNING,
            "started": _iso(started), "finished": None, "wall_s": None, "message": None, "pid": os.getpid(),
            **_environment(),
            "device": _device(config),
            "components": {c: _component(config, c) for c in _COMPONENTS},
        }
        _atomic_write_text(folder / "config.yaml", config_text)
        (folder / "history.jsonl").touch()
        (folder / HEARTBEAT).touch()
        _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))
        writer = RunWriter(self, folder, meta)
        self._index_put(_record_from_folder(folder))
        return writer

    def add_folder(self, run_id: str) -> RunRecord:
        """Index a complete run folder that was put under the root from elsewhere (``abl
        sweep`` moves in the runs its workers made); StoreError if it is not a run."""
        folder = self.root / run_id
        if run_id.startswith(".") or not (folder / "meta.json").is_file():
            raise StoreError(f"'{folder}' is not a run folder (no meta.json)")
        rec = _record_from_folder(folder)
        self._index_put(rec)
        return rec

    def check_resumable(self, rec: RunRecord) -> None:
        """Raise StoreError unless ``rec`` is an interrupted run (the only kind that resumes)."""
        if rec.status == INTERRUPTED:
            return
        if rec.status == FINISHED:
            raise StoreError(f"run {rec.run_id} is already finished; nothing to resume")
        if rec.status == RUNNING:
            meta = rec.meta
            raise StoreError(
                f"run {rec.run_id} is still running (pid {meta.get('pid')} on {meta.get('hostname')}); "
                "stop it first (kill PID sends SIGTERM, which records it interrupted), then resume it"
            )
        raise StoreError(
            f"run {rec.run_id} failed ({rec.message}); only interrupted runs resume, since a failure would "
            "repeat: fix its cause and start it again with `abl run`"
        )

    def reopen_run(self, run_id: str, *, history: list[Mapping[str, Any]]) -> "RunWriter":
        """Mark an interrupted run running again in this process, with ``history`` (the
        checkpoint's epochs) as its history: epochs logged after the checkpoint are dropped,
        since the resumed run trains them again."""
        rec = self.get(run_id)
        self.check_resumable(rec)
        folder = rec.path
        meta = dict(rec.meta)
        resumes = list(meta.get("resumed") or [])
        resumes.append(_iso(_now()))
        meta.update(
            status=RUNNING, finished=None, wall_s=None, message=None, pid=os.getpid(),
            hostname=socket.gethostname(), resumed=resumes, run_id=folder.name,
        )
        lines = "".join(json.dumps(_json_safe(dict(r)), allow_nan=False) + "\n" for r in history)
        _atomic_write_text(folder / "history.jsonl", lines)
        (folder / HEARTBEAT).touch()
        _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, allow_nan=False))
        writer = RunWriter(self, folder, meta)
        self._index_put(_record_from_folder(folder))
        return writer

    # -- reading

    def list_runs(self, status: str | None = None) -> list[RunRecord]:
        """All runs (or those with ``status``), newest first, read from the index.

        A missing, corrupt or stale index (folders it does not know) is rebuilt first.
        """
        if status is not None and status not in STATUSES:
            raise StoreError(f"unknown run status '{status}': use one of {', '.join(STATUSES)}")
        self._check_root()
        folders = self._folder_ids()
        try:
            records = self._index_read()
        except _IndexBroken:
            self.reindex()
            records = self._index_read()
        if {r.run_id for r in records} != folders:
            self.reindex()
            records = self._index_read()
        # The folders are the truth, the index a cache: a row may be stale (a writer died
        # between its folder and index writes, an update lost a race, someone edited the
        # index, a process was killed). Each folder's meta.json decides the status.
        for i, rec in enumerate(records):
            try:
                meta = _read_meta(rec.path)
            except StoreError:
                continue
            if rec.status == RUNNING or meta.get("status") != rec.status or rec.status == INTERRUPTED:
                try:
                    fresh = _record_from_folder(rec.path)
                except StoreError:
                    continue
                if fresh.status != rec.status or fresh.metrics != rec.metrics:
                    records[i] = fresh
                    self._index_put(fresh)
        if status is not None:
            records = [r for r in records if r.status == status]
        return records

    def get(self, run_id: str) -> RunRecord:
        """The run with this id, or with this unique id prefix; StoreError otherwise."""
        self._check_root()
        if not isinstance(run_id, str) or not run_id.strip():
            raise StoreError("no run id given: `abl report` lists the run ids")
        run_id = run_id.strip()
        folders = self._folder_ids()
        if run_id in folders:
            return _record_from_folder(self.root / run_id)
        matches = sorted(f for f in folders if f.startswith(run_id))
        if not matches:
            raise StoreError(f"no run '{run_id}' in '{self.root}': `abl report` lists the run ids")
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise StoreError(f"run id '{run_id}' is ambiguous ({len(matches)} runs: {shown}): give more characters")
        return _record_from_folder(self.root / matches[0])

    def reindex(self) -> int:
        """Rebuild ``index.sqlite`` from the run folders; returns the number of runs indexed.

        The new index is built beside the old one and swapped in with ``os.replace``.
        Folders whose ``meta.json`` is unreadable are skipped with a warning.
        """
        self._check_root()
        records = []
        for run_id in sorted(self._folder_ids()):
            try:
                records.append(_record_from_folder(self.root / run_id))
            except StoreError as exc:
                warnings.warn(f"reindex skips {run_id}: {exc}", stacklevel=2)
        tmp = self.root / f".{INDEX_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            conn = sqlite3.connect(str(tmp), timeout=_SQLITE_TIMEOUT_S)
            try:
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                with conn:
                    conn.executemany(self._insert_sql(), [_row_of(r, self.root) for r in records])
            finally:
                conn.close()
            # A stale journal of the old file must not be replayed into the new one.
            for suffix in ("-journal", "-wal", "-shm"):
                Path(str(self.index_path) + suffix).unlink(missing_ok=True)
            os.replace(tmp, self.index_path)
        finally:
            tmp.unlink(missing_ok=True)
        return len(records)

    # -- internals

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"no results store at '{self.root}': run an experiment first or point to the right folder")
        self._check_index_path()

    def _check_index_path(self) -> None:
        if self.index_path.exists() and not self.index_path.is_file():
            raise StoreError(
                f"the results index '{self.index_path}' is not a file: move it away; abl rebuilds the "
                "index from the run folders"
            )

    def _folder_ids(self) -> set[str]:
        return {p.name for p in self.root.iterdir()
                if not p.name.startswith(".") and (p / "meta.json").is_file()}

    @staticmethod
    def _insert_sql() -> str:
        return f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"

    def _connect(self) -> sqlite3.Connection:
        self._check_index_path()
        return sqlite3.connect(str(self.index_path), timeout=_SQLITE_TIMEOUT_S)

    def _locked(self, exc: sqlite3.Error) -> StoreError | None:
        msg = str(exc).lower()
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
            return StoreError(f"results index '{self.index_path}' stayed locked for "
                              f"{_SQLITE_TIMEOUT_S:.0f} s by another process: retry when it is done")
        return None

    def _index_read(self) -> list[RunRecord]:
        if not self.index_path.is_file():
            raise _IndexBroken
        try:
            conn = self._connect()
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    raise _IndexBroken
                rows = conn.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY started DESC, run_id DESC"
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            locked = self._locked(exc)
            if locked:
                raise locked from None
            raise _IndexBroken from None
        out = []
        for row in rows:
            d = dict(zip(_COLUMNS, row))
            try:
                metrics = _decode_metrics(json.loads(d.pop("metrics")))
            except (TypeError, json.JSONDecodeError):
                raise _IndexBroken from None
            path = Path(d.pop("path"))
            out.append(RunRecord(path=path if path.is_absolute() else self.root / path, metrics=metrics, **d))
        return out

    def _index_put(self, rec: RunRecord) -> None:
        """Upsert one row; a broken index is rebuilt, a locked one only warned about
        (the folder is already written, and ``list_runs`` heals the row later)."""
        try:
            if not self.index_path.is_file():
                raise _IndexBroken
            conn = self._connect()
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    raise _IndexBroken
                with conn:
                    conn.execute(self._insert_sql(), _row_of(rec, self.root))
            finally:
                conn.close()
        except sqlite3.Error as exc:
            if self._locked(exc):
                warnings.warn(f"results index stayed locked; run {rec.run_id} will be indexed later", stacklevel=3)
                return
            self.reindex()
        except _IndexBroken:
            self.reindex()


class RunWriter:
    """A run in progress. Use as a context manager: an exception inside marks it failed.

    Nothing can be written after :meth:`finish` or :meth:`fail` (records are immutable).
    Dropping a writer without either leaves the run ``"running"``.
    """

    def __init__(self, store: RunStore, path: Path, meta: dict[str, Any]) -> None:
        self.store = store
        self.path = path
        self.run_id: str = meta["run_id"]
        self._meta = meta
        self._t0 = time.monotonic()

    def __repr__(self) -> str:
        return f"RunWriter({self.run_id!r}, status={self.status!r})"

    @property
    def status(self) -> str:
        return self._meta["status"]

    def _check_open(self, action: str) -> None:
        if self.status != RUNNING:
            raise RuntimeError(f"cannot {action}: run {self.run_id} is already {self.status}")

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Append one record (``phase``, ``epoch`` and metric numbers) to history.jsonl."""
        self._check_open("log an epoch")
        if not isinstance(record, Mapping):
            raise ValueError(f"an epoch record must be a mapping, got {type(record).__name__}")
        clean: dict[str, Any] = {}
        for key, value in record.items():
            if not isinstance(key, str):
                raise ValueError(f"epoch record keys must be strings, got {key!r}")
            value = _as_scalar(value)
            if not isinstance(value, (int, float, str)):
                raise ValueError(f"epoch record '{key}' must be a number or a string, got {type(value).__name__}")
            clean[key] = value
        if not isinstance(clean.get("phase"), str):
            raise ValueError(f"an epoch record needs a string 'phase', got {record.get('phase')!r}")
        if isinstance(clean.get("epoch"), bool) or not isinstance(clean.get("epoch"), int):
            raise ValueError(f"an epoch record needs an int 'epoch', got {record.get('epoch')!r}")
        line = json.dumps(_json_safe(clean), allow_nan=False) + "\n"
        with open(self.path / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        (self.path / HEARTBEAT).touch()

    def save_array(self, name: str, array: np.ndarray) -> None:
        """Save ``<name>.npy`` (plain dtypes only: object arrays are refused, never pickled)."""
        self._check_open(f"save array '{name}'")
        _check_artefact_name(name)
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise ValueError(f"array '{name}' has dtype object: only plain numeric/bool arrays are stored")
        _atomic_write_bytes(self.path / f"{name}.npy", lambda f: np.save(f, array, allow_pickle=False))

    def save_json(self, name: str, data: Any) -> None:
        """Save ``<name>.json`` (plain JSON data; non-finite numbers as null)."""
        self._check_open(f"save JSON '{name}'")
        _check_artefact_name(name)
        if name in ("meta", "metrics"):
            raise ValueError(f"'{name}.json' is the store's own file; pick another name")
        _atomic_write_text(self.path / f"{name}.json", json.dumps(_json_safe(data), indent=2, allow_nan=False))

    def save_tensors(self, name: str, tensors: Mapping[str, Any]) -> None:
        """Save ``<name>.safetensors`` (e.g. a model's ``state_dict()``), copied to the CPU."""
        import torch
        from safetensors.torch import save

        self._check_open(f"save tensors '{name}'")
        _check_artefact_name(name)
        if not isinstance(tensors, Mapping):
            raise ValueError(f"tensors '{name}' must be a mapping name -> tensor")
        plain = {}
        for key, t in tensors.items():
            if not isinstance(key, str) or not isinstance(t, torch.Tensor):
                raise ValueError(f"tensors '{name}': entry {key!r} must map a string to a tensor")
            # Copy: a state_dict may share storage between entries (tied weights).
            plain[key] = t.detach().to("cpu", copy=True).contiguous()
        data = save(plain)
        _atomic_write_bytes(self.path / f"{name}.safetensors", lambda f: f.write(data))

    def save_checkpoint(self, write) -> None:
        """Write the run's checkpoint with ``write(path)`` (atomically: see ``abl.checkpoint``)."""
        from abl.checkpoint import FILE_NAME

        self._check_open("save a checkpoint")
        write(self.path / FILE_NAME)
        (self.path / HEARTBEAT).touch()

    def _drop_checkpoint(self) -> None:
        from abl.checkpoint import FILE_NAME

        (self.path / FILE_NAME).unlink(missing_ok=True)

    def finish(self, metrics: Mapping[str, Mapping[str, Any]], *, wall_s: float) -> None:
        """Record the metrics per phase and mark the run finished (metrics.json, then meta)."""
        self._check_open("finish")
        clean = validate_metrics(metrics)
        wall_s = _as_scalar(wall_s)
        if isinstance(wall_s, bool) or not isinstance(wall_s, (int, float)) or not math.isfinite(wall_s) or wall_s < 0:
            raise ValueError(f"wall_s must be a finite number of seconds >= 0, got {wall_s!r}")
        _atomic_write_text(self.path / "metrics.json", json.dumps(_json_safe(clean), indent=2, allow_nan=False))
        self._close(FINISHED, wall_s=float(wall_s), message=None)
        self._drop_checkpoint()  # a finished run never resumes

    def fail(self, message: str) -> None:
        """Mark the run failed, keeping ``message``; no metrics are recorded."""
        self._check_open("fail")
        self._close(FAILED, wall_s=time.monotonic() - self._t0, message=str(message))
        self._drop_checkpoint()  # a failed run does not resume (its failure would repeat)

    def interrupt(self, message: str = "interrupted (Ctrl-C or SIGTERM)") -> None:
        """Mark the run interrupted: stopped from outside, not failed by its own error."""
        self._check_open("interrupt")
        self._close(INTERRUPTED, wall_s=time.monotonic() - self._t0, message=str(message))

    def _close(self, status: str, *, wall_s: float, message: str | None) -> None:
        meta = {**self._meta, "status": status, "finished": _iso(_now()), "wall_s": wall_s, "message": message}
        _atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2, allow_nan=False))
        self._meta = meta
        self.store._index_put(_record_from_folder(self.path))

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.status == RUNNING:
            # SystemExit is a stop from outside too: a signal handler's sys.exit, or a Ray
            # worker leaving because its sweep driver was stopped; such a run resumes
            if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                self.interrupt()
            elif exc_type is not None:
                text = str(exc).splitlines()[0] if str(exc) else ""
                self.fail(f"{exc_type.__name__}: {text}" if text else exc_type.__name__)
            else:
                self.fail("the run's with-block ended without finish()")
        return False  # re-raise

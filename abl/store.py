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

The store is split by what each part does, with no import cycle between them:
:mod:`abl.atomic` (all-or-nothing file writes), :mod:`abl.run_folder` (a run folder's
layout, read as a :class:`RunRecord`), :mod:`abl.run_writer` (:class:`RunWriter`),
:mod:`abl.run_index` (the SQLite index) and :mod:`abl.provenance` (code revision and
versions); this module ties them into :class:`RunStore` and re-exports their public names.

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

import json
import os
import re
import secrets
import socket
import sqlite3
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from abl.atomic import atomic_write_bytes, atomic_write_text
from abl.errors import StoreError
from abl.provenance import code_revision, environment
from abl.run_folder import (
    _COMPONENTS,
    CHECKPOINT_FILE,
    FAILED,
    FINISHED,
    HEARTBEAT,
    INTERRUPTED,
    RUNNING,
    STALE_S,
    STATUSES,
    RunRecord,
    _iso,
    _json_safe,
    _now,
    _read_meta,
    _record_from_folder,
    validate_metrics,
)
from abl.run_index import INDEX_NAME, IndexBroken, RunIndex, newest_first
from abl.run_writer import RunWriter

# the names other modules imported from here before the split
_atomic_write_bytes = atomic_write_bytes
_atomic_write_text = atomic_write_text

__all__ = [
    "CHECKPOINT_FILE", "FAILED", "FINISHED", "HEARTBEAT", "INDEX_NAME", "INTERRUPTED", "RUNNING", "STALE_S",
    "STATUSES", "RunRecord", "RunStore", "RunWriter", "StoreError", "code_revision", "validate_metrics",
]


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug or "run"


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


class _IndexUnwritable(StoreError):
    """The index must be rebuilt but its folder cannot be written (e.g. mounted read-only)."""


class RunStore:
    """A results root: run folders plus ``index.sqlite``. Safe for several writer processes."""

    def __init__(self, root: str | Path = "runs") -> None:
        self.root = Path(root)
        self.index_path = self.root / INDEX_NAME
        self._index = RunIndex(self.root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # -- writing

    def create_run(
        self, config: Mapping[str, Any], *, name: str, seed: int, data_fingerprint: Mapping[str, Any] | None = None
    ) -> "RunWriter":
        """Start a run: make its folder, save the config and meta, index it as running.

        ``data_fingerprint`` (plain JSON data) is kept in ``meta.json`` for ``abl resume``
        to check the data against (see :func:`abl.experiment.data_fingerprint`)."""
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
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"results root '{self.root}' cannot be made ({exc.strerror or exc}): "
                             "pass --runs-dir DIR (or set output.runs_dir) to a folder you can write") from None
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
            **environment(),
            "device": _device(config),
            "components": {c: _component(config, c) for c in _COMPONENTS},
        }
        if data_fingerprint is not None:
            meta["data_fingerprint"] = to_plain(dict(data_fingerprint))
        atomic_write_text(folder / "config.yaml", config_text)
        (folder / "history.jsonl").touch()
        (folder / HEARTBEAT).touch()
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))
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
        atomic_write_text(folder / "history.jsonl", lines)
        (folder / HEARTBEAT).touch()
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, allow_nan=False))
        writer = RunWriter(self, folder, meta)
        self._index_put(_record_from_folder(folder))
        return writer

    # -- reading

    def list_runs(self, status: str | None = None) -> list[RunRecord]:
        """All runs (or those with ``status``), newest first, read from the index.

        A missing, corrupt or stale index (folders it does not know) is rebuilt first; where
        the root cannot be written (a read-only copy), the folders are read and nothing written.
        """
        if status is not None and status not in STATUSES:
            raise StoreError(f"unknown run status '{status}': use one of {', '.join(STATUSES)}")
        self._check_root()
        folders = self._folder_ids()
        try:
            records: list[RunRecord] | None = self._index_read()
        except IndexBroken:
            records = None
        read_only = False
        if records is None or {r.run_id for r in records} != folders:
            try:
                self.reindex()
                records = self._index_read()
            except _IndexUnwritable:
                # e.g. a read-only copy of a store: the folders alone answer, nothing is written
                read_only = True
                records = newest_first(self._folder_records())
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
                    if not read_only:
                        try:
                            self._index_put(fresh)
                        except _IndexUnwritable:
                            read_only = True
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
        records = self._folder_records()
        try:
            self._index.rebuild(records)
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise _IndexUnwritable(
                f"cannot write the results index '{self.index_path}' ({reason}): make '{self.root}' writable, "
                "or read the runs from a writable copy"
            ) from None
        return len(records)

    # -- internals

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"no results store at '{self.root}': run an experiment first or point to the right folder")
        self._check_index_path()

    def _check_index_path(self) -> None:
        self._index.check_path()

    def _folder_ids(self) -> set[str]:
        return {p.name for p in self.root.iterdir()
                if not p.name.startswith(".") and (p / "meta.json").is_file()}

    def _folder_records(self) -> list[RunRecord]:
        """Every run read from its folder, by id; unreadable folders skipped with a warning."""
        records = []
        for run_id in sorted(self._folder_ids()):
            try:
                records.append(_record_from_folder(self.root / run_id))
            except StoreError as exc:
                warnings.warn(f"reindex skips {run_id}: {exc}", stacklevel=3)
        return records

    def _index_read(self) -> list[RunRecord]:
        return self._index.read()

    def _index_put(self, rec: RunRecord) -> None:
        """Upsert one row; a broken index is rebuilt, a locked one only warned about
        (the folder is already written, and ``list_runs`` heals the row later)."""
        try:
            self._index.put(rec)
        except IndexBroken:
            self.reindex()

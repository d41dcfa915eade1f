"""The SQLite index of a results store: a cache of what the run folders say.

``index.sqlite`` holds one row per run (ids, status, times, components, final metrics) so
that listing a store with thousands of runs reads one file. It is never the truth: a
missing, corrupt or stale index is rebuilt from the folders (:meth:`RunIndex.rebuild`),
and a rebuild is written beside the old file and swapped in with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import warnings
from collections.abc import Iterable
from pathlib import Path

from abl.errors import StoreError
from abl.run_folder import _COMPONENTS, RunRecord, _decode_metrics, _json_safe

INDEX_NAME = "index.sqlite"
_SCHEMA_VERSION = 1
_SQLITE_TIMEOUT_S = 30.0

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


class IndexBroken(Exception):
    """The index file is missing, corrupt or of another schema: rebuild it."""


def _row_of(rec: RunRecord, root: Path) -> tuple:
    try:
        rel = str(rec.path.relative_to(root))
    except ValueError:
        rel = str(rec.path)
    return (rec.run_id, rec.name, rec.status, rec.started, rec.finished, rec.wall_s, rec.seed,
            rec.dataset, rec.model, rec.attack, rec.defense,
            json.dumps(_json_safe(rec.metrics)), rel)


def newest_first(records: Iterable[RunRecord]) -> list[RunRecord]:
    """``records`` in the index's order: newest start first, ties by run id descending."""
    return sorted(records, key=lambda r: (r.started or "", r.run_id), reverse=True)


class RunIndex:
    """``<root>/index.sqlite``; paths in it are stored relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / INDEX_NAME

    def check_path(self) -> None:
        """StoreError if something other than a file sits where the index goes."""
        if self.path.exists() and not self.path.is_file():
            raise StoreError(
                f"the results index '{self.path}' is not a file: move it away; abl rebuilds the "
                "index from the run folders"
            )

    @staticmethod
    def _insert_sql() -> str:
        return f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"

    def _connect(self) -> sqlite3.Connection:
        self.check_path()
        return sqlite3.connect(str(self.path), timeout=_SQLITE_TIMEOUT_S)

    def _locked(self, exc: sqlite3.Error) -> StoreError | None:
        msg = str(exc).lower()
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
            return StoreError(f"results index '{self.path}' stayed locked for "
                              f"{_SQLITE_TIMEOUT_S:.0f} s by another process: retry when it is done")
        return None

    def read(self) -> list[RunRecord]:
        """Every row, newest first; IndexBroken if the file cannot serve them."""
        if not self.path.is_file():
            raise IndexBroken
        try:
            conn = self._connect()
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    raise IndexBroken
                rows = conn.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY started DESC, run_id DESC"
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            locked = self._locked(exc)
            if locked:
                raise locked from None
            raise IndexBroken from None
        out = []
        for row in rows:
            d = dict(zip(_COLUMNS, row))
            try:
                metrics = _decode_metrics(json.loads(d.pop("metrics")))
            except (TypeError, json.JSONDecodeError):
                raise IndexBroken from None
            path = Path(d.pop("path"))
            out.append(RunRecord(path=path if path.is_absolute() else self.root / path, metrics=metrics, **d))
        return out

    def put(self, rec: RunRecord) -> None:
        """Upsert one row. IndexBroken if the file is broken (rebuild it); a locked index is
        only warned about (the folder is already written, and listing heals the row later)."""
        try:
            if not self.path.is_file():
                raise IndexBroken
            conn = self._connect()
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    raise IndexBroken
                with conn:
                    conn.execute(self._insert_sql(), _row_of(rec, self.root))
            finally:
                conn.close()
        except sqlite3.Error as exc:
            if self._locked(exc):
                warnings.warn(f"results index stayed locked; run {rec.run_id} will be indexed later", stacklevel=4)
                return
            raise IndexBroken from None

    def rebuild(self, records: list[RunRecord]) -> None:
        """Write a new index holding ``records``, beside the old one, and swap it in."""
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
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

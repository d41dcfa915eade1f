"""A run folder: what one run holds on disk, and reading it back as a :class:`RunRecord`.

A run folder (under a :class:`~abl.store.RunStore` root) holds::

    config.yaml                        # the resolved config the run was given
    meta.json                          # ids, status, times, versions, code revision
    history.jsonl                      # one JSON line per logged epoch
    metrics.json                       # numbers only, per phase; written at finish
    heartbeat                          # touched at start and after every epoch
    checkpoint.safetensors             # while the run is unfinished: where it resumes
    *.npy, *.safetensors, *.json       # arrays (allow_pickle=False), tensors, plain data

The folder is the source of truth. A run is *finished* only when ``meta.json`` says so
**and** ``metrics.json`` exists. Non-finite numbers are stored as JSON ``null`` and read
back as ``nan``. This module only reads (and validates what is to be written); writing is
:mod:`abl.run_writer`'s, indexing :mod:`abl.run_index`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from abl.errors import StoreError

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)
#: a run on another host with no sign of life (``heartbeat`` file) for this long is shown
#: interrupted; on its own host, the run's process being gone decides at once.
STALE_S = 3600.0
HEARTBEAT = "heartbeat"
#: the file ``abl.checkpoint`` writes into a run folder for ``abl resume``
CHECKPOINT_FILE = "checkpoint.safetensors"

_COMPONENTS = ("dataset", "model", "attack", "defense")
_ARTEFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


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

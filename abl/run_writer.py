"""Writing one run: :class:`RunWriter`, handed out by :meth:`abl.store.RunStore.create_run`.

Every file goes through :mod:`abl.atomic` (metrics before meta at finish), so a crash never
leaves a run that looks finished; a writer dropped without :meth:`RunWriter.finish` leaves
its run ``"running"``, which readers show as interrupted once its process is gone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from abl.atomic import atomic_write_bytes, atomic_write_text
from abl.run_folder import (
    CHECKPOINT_FILE,
    FAILED,
    FINISHED,
    HEARTBEAT,
    INTERRUPTED,
    RUNNING,
    RunRecord,
    _as_scalar,
    _check_artefact_name,
    _iso,
    _json_safe,
    _now,
    _record_from_folder,
    validate_metrics,
)


class _Indexed(Protocol):
    """What a writer needs of its store (:class:`abl.store.RunStore`): to index a record."""

    def _index_put(self, rec: RunRecord) -> None: ...


class RunWriter:
    """A run in progress. Use as a context manager: an exception inside marks it failed.

    Nothing can be written after :meth:`finish` or :meth:`fail` (records are immutable).
    Dropping a writer without either leaves the run ``"running"``.
    """

    def __init__(self, store: _Indexed, path: Path, meta: dict[str, Any]) -> None:
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
        atomic_write_bytes(self.path / f"{name}.npy", lambda f: np.save(f, array, allow_pickle=False))

    def save_json(self, name: str, data: Any) -> None:
        """Save ``<name>.json`` (plain JSON data; non-finite numbers as null)."""
        self._check_open(f"save JSON '{name}'")
        _check_artefact_name(name)
        if name in ("meta", "metrics"):
            raise ValueError(f"'{name}.json' is the store's own file; pick another name")
        atomic_write_text(self.path / f"{name}.json", json.dumps(_json_safe(data), indent=2, allow_nan=False))

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
        atomic_write_bytes(self.path / f"{name}.safetensors", lambda f: f.write(data))

    def save_checkpoint(self, write) -> None:
        """Write the run's checkpoint with ``write(path)`` (atomically: see ``abl.checkpoint``)."""
        self._check_open("save a checkpoint")
        write(self.path / CHECKPOINT_FILE)
        (self.path / HEARTBEAT).touch()

    def _drop_checkpoint(self) -> None:
        (self.path / CHECKPOINT_FILE).unlink(missing_ok=True)

    def finish(self, metrics: Mapping[str, Mapping[str, Any]], *, wall_s: float) -> None:
        """Record the metrics per phase and mark the run finished (metrics.json, then meta)."""
        self._check_open("finish")
        clean = validate_metrics(metrics)
        wall_s = _as_scalar(wall_s)
        if isinstance(wall_s, bool) or not isinstance(wall_s, (int, float)) or not math.isfinite(wall_s) or wall_s < 0:
            raise ValueError(f"wall_s must be a finite number of seconds >= 0, got {wall_s!r}")
        atomic_write_text(self.path / "metrics.json", json.dumps(_json_safe(clean), indent=2, allow_nan=False))
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
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2, allow_nan=False))
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

"""Stages shared between runs, computed once and cached by the hash of their inputs.

The backdoored model (a model trained without defense on the poisoned set) is what
activation clustering, spectral signatures and the post-training defenses start from, and
many runs of a grid share it. It is cached under ``<cache dir>/stages/`` as safetensors,
keyed by a hash of everything that decides it: the poisoned training images and labels
(so dataset, slice and attack are covered by content, whatever config produced them), the
model's initial weights (architecture and seed), the training schedule, the engine
settings that change the arithmetic (batch size, optimizer, device type, bf16) and the
seed of the data order. Any change to any of them is a different key; nothing is ever
served stale. The file's JSON header keeps the inputs that are readable (schedule,
settings) and the model's CA/ASR, so a run that reuses it can report them.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from abl.config import check
from abl.data.loader import AugmentConfig
from abl.engine import Engine
from abl.store import _atomic_write_bytes

STAGE_FORMAT = 1
_META_KEY = "abl_stage"


@dataclass
class BackdoorSchedule:
    """How the backdoored model is trained: the ABL paper's no-defense schedule
    (appendix A.2: 100 epochs at lr 0.1, divided by 10 at epochs 20 and 70, no augmentation)."""

    epochs: int = 100
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [20, 70])
    lr_factor: float = 0.1
    augment: bool = False

    def validate(self) -> None:
        check(self.epochs >= 1, "backdoor.epochs", "must be >= 1")
        check(self.lr > 0, "backdoor.lr", "must be > 0")
        check(0 < self.lr_factor <= 1, "backdoor.lr_factor", "must be in (0, 1]")


def _engine_settings(engine: Engine) -> dict[str, Any]:
    c = engine.cfg
    return {
        "batch_size": c.batch_size, "momentum": c.momentum, "weight_decay": c.weight_decay, "nesterov": c.nesterov,
        "device_type": engine.device.type, "bf16": engine.autocast_dtype is not None, "channels_last": engine.channels_last,
        "seed": engine.seed,
    }


def stage_key(kind: str, engine: Engine, spec: dict[str, Any]) -> str:
    """The hash of a stage's inputs (see the module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "format": STAGE_FORMAT, "spec": spec, "engine": _engine_settings(engine)},
                        sort_keys=True).encode())
    for t in (engine.data.images, engine.data.labels):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for name, t in sorted(engine.model.state_dict().items()):
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()[:32]


class StageLock:
    """An exclusive advisory lock (``flock``) on ``<stage file>.lock``, held by the one run
    that computes a stage, so that runs sharing a cache folder (the cells of ``abl sweep``
    on one machine or a shared filesystem) compute it once: the others wait, then read the
    cached file. The kernel drops the lock when its process dies, so a killed run never
    blocks the others. Where ``fcntl`` is missing (Windows) it locks nothing."""

    def __init__(self, stage_file: Path) -> None:
        self.path = stage_file.with_name(stage_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self, wait: bool = True) -> "StageLock":
        """Take the lock; with ``wait=False`` raise :class:`StageBusy` if another process
        holds it instead of blocking."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise StageBusy(self.path) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class StageBusy(Exception):
    """Another process is computing this stage, and this run was told not to wait for it
    (:func:`no_stage_waiting`): ``abl sweep`` then runs other cells first."""

    def __init__(self, lock_path: Path) -> None:
        super().__init__(f"another run is computing the stage locked by {lock_path}")
        self.lock_path = lock_path


_WAIT_FOR_STAGES = True


@contextmanager
def no_stage_waiting(enabled: bool = True) -> Iterator[None]:
    """Inside, a run whose stage another process is computing raises :class:`StageBusy`
    instead of waiting (with ``enabled=False``, nothing changes). A sweep worker that waited
    would hold its CPU or GPU share idle while other cells queue."""
    global _WAIT_FOR_STAGES
    before = _WAIT_FOR_STAGES
    _WAIT_FOR_STAGES = not enabled and before
    try:
        yield
    finally:
        _WAIT_FOR_STAGES = before


def claim_stage(path: Path | None) -> tuple[bool, StageLock | None]:
    """Whether the stage at ``path`` is cached (``hit``); on a miss, the lock to hold while
    computing it. A run that waited for another one's lock finds the file and gets a hit."""
    if path is None:
        return False, None
    if path.is_file():
        return True, None
    lock = StageLock(path).acquire(wait=_WAIT_FOR_STAGES)
    if path.is_file():
        lock.release()
        return True, None
    return False, lock


def stage_dir_for(cache_dir: str | os.PathLike | None) -> Path:
    from abl.data.cache import resolve_cache_dir

    return resolve_cache_dir(cache_dir) / "stages"


def backdoored_model(engine: Engine, schedule: BackdoorSchedule) -> dict[str, Any]:
    """Put the backdoored model into ``engine.model``: read from the stage cache, or trained
    with ``schedule`` (phase ``backdoor``) and then cached. Call it before any other
    training, on the freshly initialised model (its weights are part of the key).

    Returns ``{"key", "hit", "metrics"}``: ``hit`` tells whether the cache served it,
    ``metrics`` its CA/ASR. The decision is kept in ``engine.state``, so a run resumed
    after the stage was trained finishes it from its checkpoint rather than switching to
    the cache half-way.
    """
    stages = engine.state.setdefault("stages", {})
    spec = {"schedule": asdict(schedule)}
    lock = None
    if "backdoored" not in stages:  # decided once; a resumed run keeps its checkpoint's decision
        key = stage_key("backdoored", engine, spec)
        path = engine.stage_dir / f"backdoored-{key}.safetensors" if engine.stage_dir is not None else None
        hit, lock = claim_stage(path)
        stages["backdoored"] = {"key": key, "hit": hit}
    info = stages["backdoored"]
    path = engine.stage_dir / f"backdoored-{info['key']}.safetensors" if engine.stage_dir is not None else None
    if info["hit"]:
        assert path is not None
        weights, meta = _read(path)
        engine.model.load_state_dict(weights)
        engine.skip_phase("backdoor")
        return {**info, "metrics": meta["metrics"]}
    try:
        engine.run_phase(
            "backdoor",
            epochs=schedule.epochs,
            lr=schedule.lr,
            milestones=schedule.milestones,
            lr_factor=schedule.lr_factor,
            augment=AugmentConfig() if schedule.augment else None,
        )
        last = engine.history[-1]
        metrics = {k: float(last[k]) for k in ("clean_acc", "asr") if k in last}
        if path is not None:
            _write(path, engine.model.state_dict(), {"spec": spec, "engine": _engine_settings(engine), "metrics": metrics})
    finally:
        if lock is not None:
            lock.release()
    return {**info, "metrics": metrics}


def stage_path(engine: Engine, kind: str, key: str) -> Path | None:
    """Where stage ``kind`` with ``key`` is cached (None: the engine caches nothing)."""
    return engine.stage_dir / f"{kind}-{key}.safetensors" if engine.stage_dir is not None else None


def write_stage(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Cache a stage: tensors as safetensors, ``meta`` (JSON-able) in its header."""
    _write(path, tensors, meta)


def read_stage(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A cached stage's tensors and meta; a clear error when the file is unreadable."""
    return _read(path)


def _write(path: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()},
                metadata={_META_KEY: json.dumps({"format": STAGE_FORMAT, **meta})})
    _atomic_write_bytes(path, lambda f: f.write(data))  # concurrent writers of one key write the same bytes


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    from abl.errors import StoreError

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise StoreError(f"cached stage '{path}' is unreadable ({exc}); delete it and run again") from None
    return weights, meta


def control_model(engine: Engine, schedule: BackdoorSchedule) -> dict[str, Any]:
    """The clean-model control (issue 24): train ``engine.model`` with ``schedule`` (phase
    ``control``) on ``engine.data``, the clean training set without any poison, or read it
    from the stage cache, then evaluate it on the engine's clean and triggered test sets.

    The key covers the clean images and labels, the initial weights, the schedule and the
    engine settings, but not the attack: every attack and rate on one dataset slice, model
    and schedule shares one control model, and only its evaluation (the attack's trigger on
    the test set) is per run. Removing each run's own poisons instead would make one model
    per attack and rate; the oracle that does that is the ``clean`` defense.

    Returns ``{"key", "hit", "metrics"}``; ``metrics`` holds ``clean_acc`` and ``asr``.
    """
    spec = {"schedule": asdict(schedule)}
    key = stage_key("control", engine, spec)
    path = stage_path(engine, "control", key)
    hit, lock = claim_stage(path)
    try:
        if hit:
            assert path is not None
            weights, _ = _read(path)
            engine.model.load_state_dict(weights)
        else:
            engine.run_phase("control", epochs=schedule.epochs, lr=schedule.lr, milestones=schedule.milestones,
                             lr_factor=schedule.lr_factor, augment=AugmentConfig() if schedule.augment else None)
            if path is not None:
                _write(path, engine.model.state_dict(), {"spec": spec, "engine": _engine_settings(engine)})
    finally:
        if lock is not None:
            lock.release()
    metrics = engine.evaluate(full=True)
    return {"key": key, "hit": hit, "metrics": {k: float(metrics[k]) for k in ("clean_acc", "asr") if k in metrics}}

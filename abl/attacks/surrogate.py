"""Shared helpers of the optimisation-based attacks: a clean surrogate model and a cache.

An optimisation-based attack (``cl``, ``trojannn``) needs a model trained on the clean
training data and spends compute optimising a trigger or a perturbed poison set. Both are
cached on disk as safetensors (never pickle) under ``<cache dir>/attacks/`` and keyed by
the sha256 of a canonical JSON of every parameter that changes them plus a fingerprint of
the training data, so a second run with the same settings reuses them:

* :func:`train_clean_model` trains a model on clean data with the project's
  :class:`~abl.engine.Engine`;
* :func:`cached_tensors` is the generic cache (atomic writes, corrupt files rebuilt);
* :func:`clean_surrogate` is the cached surrogate (its ``state_dict``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abl.config import check
from abl.data.cache import resolve_cache_dir
from abl.data.loader import AugmentConfig
from abl.data.types import ImageSplit, PoisonedSet

#: Bump when an attack's optimisation changes, so that old cache files are no longer used.
CACHE_FORMAT = 1


def data_fingerprint(split: ImageSplit) -> str:
    """sha256 of the split's uint8 image bytes, its labels and its shape (one fast pass)."""
    h = hashlib.sha256()
    h.update(repr((tuple(split.images.shape), str(split.images.dtype))).encode())
    h.update(split.images.detach().cpu().contiguous().numpy().tobytes())
    h.update(split.labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, shape and dtype (for keys that depend on a tensor)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(repr((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_key(key: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys) of ``key`` and :data:`CACHE_FORMAT`."""
    text = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(kind: str, key: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/attacks/<kind>-<hash>.safetensors`` (cache_dir: env ``ABL_CACHE_DIR``
    else ``~/.cache/abl``)."""
    return resolve_cache_dir(cache_dir) / "attacks" / f"{kind}-{cache_key(key)}.safetensors"


def cached_tensors(
    kind: str,
    key: Mapping[str, Any],
    build: Callable[[], dict[str, torch.Tensor]],
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``build()`` makes for ``key``, computed once and then read from disk.

    ``key`` must hold every parameter that changes the result, including a fingerprint of
    the data (:func:`data_fingerprint`). The file is written to a temporary name and moved
    into place with :func:`os.replace`; an unreadable file is ignored (with a warning) and
    rebuilt. Returned tensors are on the CPU. Processes sharing the cache folder (the cells
    of ``abl sweep``) build a file once: the first holds a lock on it while building, the
    others wait and read it (:func:`abl.stages.claim_stage`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from abl.stages import StageLock, claim_stage

    path = cache_path(kind, key, cache_dir)
    hit, lock = claim_stage(path)
    try:
        if hit:
            try:
                return load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                warnings.warn(f"ignoring unreadable attack cache file {path}: {exc}; rebuilding it", stacklevel=2)
                lock = StageLock(path).acquire()
        tensors = {k: v.detach().cpu().contiguous() for k, v in build().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"kind": kind, "key": json.dumps(dict(key), sort_keys=True, default=str)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return tensors
    finally:
        if lock is not None:
            lock.release()


#: How often a long fit (:class:`FitCheckpoint`) writes its progress, in seconds: often
#: enough that a killed CPU fit loses one epoch, rarely enough that a GPU fit of 600 short
#: epochs does not spend its time writing ~100 MB files.
CHECKPOINT_SECONDS = 120.0


class FitCheckpoint:
    """The progress of a long attack fit, kept beside its cache file so that a fit killed
    part-way (a session's end, a pre-empted GPU) resumes where it stopped instead of
    starting over: the Dynamic generators take hours on a CPU.

    ``<cache file stem>.partial.safetensors`` holds the tensors (weights, optimiser
    buffers, random-number states) and string metadata; it is written atomically at most
    every :data:`CHECKPOINT_SECONDS`, read back by :meth:`load` (an unreadable file is
    ignored with a warning) and removed once the finished fit is cached. Only the process
    holding the cache file's lock (:func:`cached_tensors`) builds, so only it writes here.
    """

    def __init__(self, cache_file: Path, every_s: float | None = None) -> None:
        self.path = cache_file.with_name(cache_file.name.removesuffix(".safetensors") + ".partial.safetensors")
        self.every_s = CHECKPOINT_SECONDS if every_s is None else every_s
        self._last = time.monotonic()

    def due(self) -> bool:
        """Whether :attr:`every_s` has passed since the last save (or since the start)."""
        return time.monotonic() - self._last >= self.every_s

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}-", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=dict(meta))
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._last = time.monotonic()

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The saved tensors and metadata, or None when there is no readable checkpoint."""
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            warnings.warn(f"ignoring unreadable fit checkpoint {self.path}: {exc}; the fit starts over", stacklevel=2)
            return None
        return tensors, meta

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """An optimiser's state as flat tensors ``<prefix>.<param index>.<name>`` and its param
    groups (learning rates included) as JSON, for a safetensors checkpoint."""
    sd = opt.state_dict()
    tensors = {
        f"{prefix}.{idx}.{name}": value
        for idx, state in sd["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, json.dumps(sd["param_groups"])


def load_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: Mapping[str, torch.Tensor], groups: str) -> None:
    """Restore what :func:`optimizer_tensors` saved into ``opt`` (built as it was)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        head, _, name = key.rpartition(".")
        owner, _, idx = head.rpartition(".")
        if owner == prefix:
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(module: nn.Module, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
    module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def train_clean_model(
    train: ImageSplit,
    num_classes: int,
    *,
    model: Mapping[str, Any] | None = None,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train ``model`` (a model spec, default WRN-16-1) on the CLEAN ``train`` split.

    Plain SGD (momentum 0.9, weight decay 1e-4) with random crop and flip, the learning
    rate divided by 10 at 50% and 75% of the epochs, through the project's
    :class:`~abl.engine.Engine`. Returns the model in eval mode on ``device``.
    """
    from abl.engine import Engine, TrainConfig
    from abl.models import MODELS

    spec = dict(model) if model is not None else {"name": "wrn"}
    torch.manual_seed(seed)
    net = MODELS.create(spec, "attack.surrogate_model").build(num_classes, int(train.images.shape[-1]))
    images = train.images.to(device)
    labels = train.labels.to(device)
    data = PoisonedSet(images, labels, labels.clone(), torch.zeros(len(labels), dtype=torch.bool, device=device))
    probe = ImageSplit(train.images[:256], train.labels[:256])
    cfg = TrainConfig(batch_size=batch_size, progress=False, eval_every=0)
    engine = Engine(net, data, probe, None, cfg, seed=seed)
    milestones = sorted({m for m in (epochs // 2, (3 * epochs) // 4) if 0 < m < epochs})
    engine.run_phase(
        "surrogate", epochs=epochs, lr=lr, milestones=milestones, augment=AugmentConfig(crop_padding=4, flip=True, cutout=0)
    )
    return engine.model.eval()


def clean_surrogate(
    train: ImageSplit,
    num_classes: int,
    *,
    model: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """A clean surrogate, trained once by :func:`train_clean_model` and cached by its
    settings and the data ``fingerprint``; returned in eval mode, gradients off, on ``device``."""
    from abl.models import MODELS

    key = {
        "model": {"name": model},
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "num_classes": num_classes,
        "data": fingerprint,
    }

    def build() -> dict[str, torch.Tensor]:
        net = train_clean_model(
            train, num_classes, model={"name": model}, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
        )
        return net.state_dict()

    state = cached_tensors("surrogate", key, build, cache_dir)
    net = MODELS.create({"name": model}, "attack.surrogate_model").build(num_classes, int(train.images.shape[-1]))
    net.load_state_dict(state)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass
class SurrogateParams:
    """Fields shared by attacks that optimise against a clean surrogate model.

    Mixed into such attacks (``class X(SurrogateParams, Attack)``); ``surrogate_seed``
    seeds the surrogate apart from the attack's ``seed``, so seed sweeps share it.
    """

    surrogate_model: str = "wrn"
    surrogate_epochs: int = 10
    surrogate_lr: float = 0.05
    surrogate_batch_size: int = 128
    surrogate_seed: int = 0
    cache_dir: str | None = None

    def validate_surrogate(self) -> None:
        from abl.models import MODELS

        check(self.surrogate_model in MODELS, "attack.surrogate_model",
              f"must be one of {', '.join(MODELS.names())}, got {self.surrogate_model!r}")
        check(self.surrogate_epochs >= 1, "attack.surrogate_epochs", f"must be >= 1, got {self.surrogate_epochs}")
        check(self.surrogate_lr > 0, "attack.surrogate_lr", f"must be > 0, got {self.surrogate_lr}")
        check(self.surrogate_batch_size >= 1, "attack.surrogate_batch_size", f"must be >= 1, got {self.surrogate_batch_size}")

    def surrogate_key(self) -> dict[str, Any]:
        """The surrogate's settings, as part of an artefact's cache key."""
        return {
            "model": self.surrogate_model,
            "epochs": self.surrogate_epochs,
            "lr": self.surrogate_lr,
            "batch_size": self.surrogate_batch_size,
            "seed": self.surrogate_seed,
        }

    def load_surrogate(
        self, train: ImageSplit, num_classes: int, device: torch.device | str, fingerprint: str
    ) -> nn.Module:
        """The clean surrogate for these settings (trained once, then read from the cache)."""
        return clean_surrogate(
            train,
            num_classes,
            model=self.surrogate_model,
            epochs=self.surrogate_epochs,
            lr=self.surrogate_lr,
            batch_size=self.surrogate_batch_size,
            seed=self.surrogate_seed,
            device=device,
            fingerprint=fingerprint,
            cache_dir=self.cache_dir,
        )

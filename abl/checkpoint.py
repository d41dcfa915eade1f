"""Checkpoints that let an interrupted run continue where it stopped (``abl resume``).

One checkpoint is one ``checkpoint.safetensors`` file in the run folder: every tensor
(model, optimizer momentum, the per-example loss record, RNG states, the defense's state)
as safetensors, and everything else (epoch counters, the history, the defense's numbers)
as JSON in the file's metadata header. One file written through a temp file and
``os.replace``: a process killed while writing leaves the previous checkpoint intact, and
reading one never unpickles anything.

Nested values (dicts with string keys, lists, tuples, numbers, strings, None, tensors)
are packed into JSON with each tensor replaced by a reference to its safetensors entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from abl.atomic import atomic_write_bytes
from abl.errors import StoreError
from abl.run_folder import CHECKPOINT_FILE as FILE_NAME

FORMAT = "abl-checkpoint/1"
_META_KEY = "abl_checkpoint"
_REF = "__tensor__"


def pack(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """``value`` as JSON data, its tensors moved (as CPU copies) into ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_REF: key}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint state keys must be strings, got {k!r} under '{prefix}'")
            if k == _REF:
                raise TypeError(f"'{_REF}' is reserved in checkpoint state")
            out[k] = pack(v, tensors, f"{prefix}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [pack(v, tensors, f"{prefix}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state '{prefix}' holds a {type(value).__name__}: only tensors, numbers, strings, lists and dicts")


def unpack(value: Any, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> Any:
    """The inverse of :func:`pack` (tuples come back as lists), tensors on ``device``."""
    if isinstance(value, dict):
        if set(value) == {_REF}:
            return tensors[value[_REF]].to(device)
        return {k: unpack(v, tensors, device) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack(v, tensors, device) for v in value]
    return value


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with its integer parameter keys as strings (JSON keys)."""
    sd = opt.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    opt.load_state_dict({"state": {int(k): v for k, v in saved["state"].items()}, "param_groups": saved["param_groups"]})


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (see :func:`pack`) to ``path`` atomically."""
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    meta = pack(state, tensors, "s")
    # allow_nan: the history may hold NaN (an undefined rate); only Python reads this back
    header = json.dumps({"format": FORMAT, "state": meta}, allow_nan=True)
    data = st_save(tensors, metadata={_META_KEY: header})
    atomic_write_bytes(path, lambda f: f.write(data))


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a clear :class:`StoreError` if it is not one."""
    from safetensors import SafetensorError, safe_open

    how = "delete it and start the run again with `abl run`"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise StoreError(f"no checkpoint at '{path}'") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise StoreError(f"checkpoint '{path}' is unreadable ({str(exc).splitlines()[0] if str(exc) else exc}); {how}") from None
    try:
        doc = json.loads(header) if header is not None else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("state"), dict):
        raise StoreError(f"checkpoint '{path}' is not an {FORMAT} file; {how}")
    try:
        return unpack(doc["state"], tensors, device)
    except KeyError as exc:
        raise StoreError(f"checkpoint '{path}' refers to a tensor it does not hold ({exc}); {how}") from None

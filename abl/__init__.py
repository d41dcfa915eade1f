"""abl: Anti-Backdoor Learning (Li et al., NeurIPS 2021) and the attacks to test it.

The Python API (see the README): :func:`run` an experiment, :func:`open_store` to read
results, :func:`load_model` to use a run's model. They are imported on first use, so
``import abl`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {"run": "abl.api", "open_store": "abl.api", "load_model": "abl.inference"}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'abl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

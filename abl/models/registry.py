"""The model registry: ``MODELS.create({"name": "wrn", "depth": 16})``."""

from __future__ import annotations

from abl.registry import Registry

MODELS: Registry = Registry("model")

"""The dataset registry: ``DATASETS.create({"name": "cifar10", "root": ...})``."""

from __future__ import annotations

from abl.registry import Registry

DATASETS: Registry = Registry("dataset")

"""Datasets as uint8 tensors, poisoned once, batched on the training device."""

from abl.data import arrays, datasets  # noqa: F401  (registration)
from abl.data.registry import DATASETS
from abl.data.types import DatasetSplits, ImageSplit, PoisonedSet, TriggeredTestSet

__all__ = ["DATASETS", "DatasetSplits", "ImageSplit", "PoisonedSet", "TriggeredTestSet"]

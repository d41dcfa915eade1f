"""Plain tensor containers for datasets and poisoned training sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abl.errors import DataError


@dataclass
class ImageSplit:
    """One split of a dataset: ``images`` uint8 ``(N, 3, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def check(self, num_classes: int, what: str) -> None:
        """Raise DataError if the tensors are malformed or a label is out of range."""
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(f"{what}: images must be uint8 (N, 3, H, W), got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{what}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if len(self) == 0:
            raise DataError(f"{what}: no images found")
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(f"{what}: label {bad} is out of range for {num_classes} classes (expected 0..{num_classes - 1})")

    def subset(self, index: torch.Tensor) -> "ImageSplit":
        return ImageSplit(self.images[index], self.labels[index])


@dataclass
class DatasetSplits:
    """A loaded dataset: train and test splits plus class metadata."""

    name: str
    train: ImageSplit
    test: ImageSplit
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    source: Path | None = None
    #: for datasets read from files: each training image's path relative to ``source``,
    #: so isolated examples can be traced back to the user's files.
    train_files: list[str] | None = None
    #: where each training example came from: position ``i`` holds the record at index
    #: ``train_order[i]`` of the source order (file order, or the batches' record order),
    #: after the dataset's load-time shuffle and any slice; ``None``: source order.
    train_order: torch.Tensor | None = None
    #: the dataset cache's content hash of the source files (one entry per part, e.g. the
    #: training and the test folder), recorded with each run and checked when it resumes;
    #: ``None`` for data not read through the cache
    fingerprint: Any = None

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def check(self) -> None:
        self.train.check(self.num_classes, f"{self.name} train split")
        self.test.check(self.num_classes, f"{self.name} test split")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {tuple(self.train.images.shape[1:])} but test images are "
                f"{tuple(self.test.images.shape[1:])}; set the dataset 'size' so both are resized alike"
            )
        n = len(self.train)
        if self.train_files is not None and len(self.train_files) != n:
            raise DataError(f"{self.name}: {n} train images but {len(self.train_files)} train file names")
        if self.train_order is not None and self.train_order.shape != (n,):
            raise DataError(f"{self.name}: {n} train images but a train order of shape {tuple(self.train_order.shape)}")

    def reordered(self, order: torch.Tensor) -> "DatasetSplits":
        """The same splits with the training split (and its file names and order) taken at
        ``order``, positions into the current training split; the test split is shared."""
        order = order.long()
        return DatasetSplits(
            self.name,
            self.train.subset(order),
            self.test,
            self.num_classes,
            self.class_names,
            self.source,
            [self.train_files[i] for i in order.tolist()] if self.train_files is not None else None,
            self.train_order[order] if self.train_order is not None else order,
            fingerprint=self.fingerprint,
        )


@dataclass
class PoisonedSet:
    """A training set after poisoning, as plain tensors (poisoned once, then only read).

    ``labels`` are what the learner sees, ``true_labels`` the labels before poisoning and
    ``poison_mask`` the ground truth of which examples carry the attack.
    """

    images: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor
    poison_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "PoisonedSet":
        return PoisonedSet(*(t.to(device) for t in (self.images, self.labels, self.true_labels, self.poison_mask)))


@dataclass
class TriggeredTestSet:
    """Test images with the trigger applied, for ASR and robust accuracy.

    ``true_labels`` are the images' real classes and ``attack_labels`` the labels the
    attacker wants the model to output (the target for all-to-one attacks).
    """

    images: torch.Tensor
    true_labels: torch.Tensor
    attack_labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.true_labels.shape[0])

"""Blend (Chen, Liu, Li, Lu & Song, 2017, arXiv 1712.05526): blend a whole-image pattern."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from abl.attacks.base import ATTACKS, Attack, load_pattern_file
from abl.config import check

_SPLIT_STREAM = {"train": 0, "test": 1}  # train and test positions draw different noise


@ATTACKS.register("blend")
@dataclass
class Blend(Attack):
    """Blended injection: ``x' = (1 - alpha) * x + alpha * pattern``, relabelled to the target.

    Default pattern: seeded uniform random pixels (the ABL paper's "random pixel" Blend).

    Parameters:
        alpha: blend ratio (0.2 as in the ABL paper).
        pattern_file: an image (any size, resized) to blend instead of random pixels.
        pattern_seed: seed of the random pattern (independent of which examples are poisoned).
        pattern: ``fixed`` (ours): one colour pattern for every image; ``per_image_gray``:
            fresh grayscale uniform noise for each image, train and test, as the authors'
            code (bboylyg/ABL at 3fd736c) draws it. Here the noise is reproducible: image
            ``i`` of a split gets the noise of a generator seeded by ``(pattern_seed,
            split, i)``; :meth:`apply` alone (no positions) uses the batch order 0..N-1.

    Example::

        ATTACKS.create({"name": "blend", "alpha": 0.2})
    """

    alpha: float = 0.2
    pattern_file: str | None = None
    pattern_seed: int = 0
    pattern: Literal["fixed", "per_image_gray"] = "fixed"

    def validate(self) -> None:
        super().validate()
        check(0.0 < self.alpha <= 1.0, "attack.alpha", f"must be in (0, 1], got {self.alpha}")
        check(self.pattern == "fixed" or self.pattern_file is None, "attack.pattern", "must be 'fixed' with a pattern_file")
        if self.pattern == "per_image_gray":  # numpy's seed sequences take non-negative integers
            check(self.pattern_seed >= 0, "attack.pattern_seed", f"must be >= 0 with per_image_gray, got {self.pattern_seed}")

    def build(self, image_size: int) -> None:
        if self.pattern == "per_image_gray":
            self.pattern_image = None
        elif self.pattern_file is not None:
            self.pattern_image = load_pattern_file(self.pattern_file, image_size, "attack.pattern_file", resize=True)
        else:
            gen = torch.Generator().manual_seed(self.pattern_seed)
            self.pattern_image = torch.randint(0, 256, (3, image_size, image_size), generator=gen).float() / 255.0

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {} if self.pattern_image is None else {"pattern": self.pattern_image}

    def noise(self, index: torch.Tensor, split: str) -> torch.Tensor:
        """Grayscale uniform noise ``(N, 1, H, W)`` in [0, 1] for the images at positions ``index``."""
        s = self.image_size
        out = np.empty((len(index), 1, s, s), dtype=np.uint8)
        for k, i in enumerate(index.tolist()):
            rng = np.random.default_rng((self.pattern_seed, _SPLIT_STREAM[split], i))
            out[k, 0] = rng.integers(0, 256, (s, s), dtype=np.uint8)
        return torch.from_numpy(out).float() / 255.0

    def apply_at(self, x: torch.Tensor, index: torch.Tensor, split: Literal["train", "test"]) -> torch.Tensor:
        if self.pattern_image is not None:
            return self.apply(x)
        return torch.lerp(x, self.noise(index.cpu(), split).to(x.device, x.dtype), self.alpha)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern_image is None:
            return self.apply_at(x, torch.arange(len(x)), "test")
        pattern = self._on(x.device, pattern=self.pattern_image)["pattern"].to(x.dtype)
        return torch.lerp(x, pattern, self.alpha)

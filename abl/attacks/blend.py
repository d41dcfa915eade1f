"""Blend (Chen, Liu, Li, Lu & Song, 2017, arXiv 1712.05526): blend a whole-image pattern."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abl.attacks.base import ATTACKS, Attack, load_pattern_file
from abl.config import check


@ATTACKS.register("blend")
@dataclass
class Blend(Attack):
    """Blended injection: ``x' = (1 - alpha) * x + alpha * pattern``, relabelled to the target.

    Default pattern: seeded uniform random pixels (the ABL paper's "random pixel" Blend).

    Parameters:
        alpha: blend ratio (0.2 as in the ABL paper).
        pattern_file: an image (any size, resized) to blend instead of random pixels.
        pattern_seed: seed of the random pattern (independent of which examples are poisoned).

    Example::

        ATTACKS.create({"name": "blend", "alpha": 0.2})
    """

    alpha: float = 0.2
    pattern_file: str | None = None
    pattern_seed: int = 0

    def validate(self) -> None:
        super().validate()
        check(0.0 < self.alpha <= 1.0, "attack.alpha", f"must be in (0, 1], got {self.alpha}")

    def build(self, image_size: int) -> None:
        if self.pattern_file is not None:
            self.pattern_image = load_pattern_file(self.pattern_file, image_size, "attack.pattern_file", resize=True)
        else:
            gen = torch.Generator().manual_seed(self.pattern_seed)
            self.pattern_image = torch.randint(0, 256, (3, image_size, image_size), generator=gen).float() / 255.0

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern_image}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self._on(x.device, pattern=self.pattern_image)["pattern"].to(x.dtype)
        return torch.lerp(x, pattern, self.alpha)

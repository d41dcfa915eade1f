"""BadNets (Gu, Dolan-Gavitt & Garg, 2017, arXiv 1708.06733): a fixed patch trigger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from abl.attacks.base import ATTACKS, Attack, load_pattern_file
from abl.config import check

# The ABL authors' 3x3 grid (rows top to bottom), the same on every channel.
AUTHORS_GRID = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


@ATTACKS.register("badnets")
@dataclass
class BadNets(Attack):
    """BadNets: stamp a small patch into a corner and relabel to the target.

    Dirty-label, all-to-one or all-to-all. Default trigger: the ABL authors' 3x3 grid in
    the bottom-right corner (CIFAR-10 rows 29-31 = [0,0,255] / [0,255,0] / [255,0,255]).

    Parameters:
        size: side of the square patch in pixels (3).
        position: corner of the patch, or ``[row, col]`` of its top-left pixel.
        margin: pixels between the patch and the image border when a corner is named (0).
        pattern: ``grid`` (the authors' grid, tiled for other sizes), ``white``, or
            ``random`` (seeded binary noise).
        pattern_file: an image/array of ``size`` x ``size`` pixels used as the patch instead.

    Input: float ``(N, 3, H, W)`` in [0, 1]. Example::

        ATTACKS.create({"name": "badnets", "rate": 0.1, "target": 0})
    """

    size: int = 3
    position: Literal["bottom_right", "bottom_left", "top_left", "top_right"] | list[int] = "bottom_right"
    margin: int = 0
    pattern: Literal["grid", "white", "random"] = "grid"
    pattern_file: str | None = None

    def validate(self) -> None:
        super().validate()
        check(self.size >= 1, "attack.size", "must be >= 1")
        check(self.margin >= 0, "attack.margin", "must be >= 0")
        if isinstance(self.position, list):
            check(len(self.position) == 2 and min(self.position) >= 0, "attack.position", "must be a corner name or [row, col] >= 0")

    def _origin(self, image_size: int) -> tuple[int, int]:
        far = image_size - self.margin - self.size
        if isinstance(self.position, list):
            return self.position[0], self.position[1]
        return {
            "bottom_right": (far, far),
            "bottom_left": (far, self.margin),
            "top_left": (self.margin, self.margin),
            "top_right": (self.margin, far),
        }[self.position]

    def build(self, image_size: int) -> None:
        s = self.size
        row, col = self._origin(image_size)
        check(
            0 <= row and 0 <= col and row + s <= image_size and col + s <= image_size,
            "attack.position",
            f"puts a {s}x{s} patch at ({row}, {col}), outside a {image_size}x{image_size} image",
        )
        if self.pattern_file is not None:
            patch = load_pattern_file(self.pattern_file, s, "attack.pattern_file")
        elif self.pattern == "grid":
            reps = -(-s // 3)
            patch = AUTHORS_GRID.repeat(reps, reps)[:s, :s].expand(3, s, s)
        elif self.pattern == "white":
            patch = torch.ones(3, s, s)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            patch = (torch.rand(s, s, generator=gen) < 0.5).float().expand(3, s, s)
        self.mask = torch.zeros(1, image_size, image_size)
        self.mask[:, row : row + s, col : col + s] = 1.0
        self.pattern_image = torch.zeros(3, image_size, image_size)
        self.pattern_image[:, row : row + s, col : col + s] = patch

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "pattern": self.pattern_image}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp_patch(x)

"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021):
a small, smooth warp of the whole image as the trigger."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from abl.attacks.base import ATTACKS, Attack, draw_unpoisoned
from abl.config import check
from abl.data.types import ImageSplit, PoisonedSet

_CROSS_STREAM, _NOISE_STREAM = 1, 2  # the cross examples' choice and noise draw from their own seed streams
_U64 = (1 << 64) - 1


def identity_grid(size: int) -> torch.Tensor:
    """The ``grid_sample`` grid ``(H, W, 2)`` that maps every pixel to itself
    (``[..., 0]`` the column, ``[..., 1]`` the row, both in [-1, 1])."""
    a = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    return torch.stack((cols, rows), 2)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of ``x`` ``(N, C, H, W)`` at ``grid`` ``(H, W, 2)`` or ``(N, H, W, 2)``."""
    grid = grid.to(x.dtype)
    if grid.ndim == 3:
        grid = grid.expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=True).clamp_(0, 1)


@ATTACKS.register("wanet")
@dataclass
class WaNet(Attack):
    """WaNet: warp the image with a fixed smooth field and relabel to the target.

    A ``k x k`` field of random offsets in [-1, 1], scaled to mean magnitude 1, is
    upsampled (bicubic) to the image size; the warp samples pixel ``p`` at
    ``clamp((p + s * field(p) / H) * grid_rescale, -1, 1)`` in ``grid_sample``'s [-1, 1]
    coordinates: a pixel moves by about ``s * field / 2`` pixels (at the defaults on 32x32
    images about 0.17 on average and under 0.7 at most, for grid seeds 0-4). "Noise mode": besides
    the poisons, ``cross_ratio`` times as many other training images are warped with the
    same field plus fresh per-pixel noise uniform in ``[-1/H, 1/H]`` and keep their true
    labels, so that the model learns the exact warp rather than any warp. They are not
    poisons; their indices are in :attr:`mix_index` (stored with the trigger).

    Defaults are the authors' CIFAR-10 settings (VinAIResearch/Warping-based_Backdoor_Attack-release
    at 45e8c33, ``config.py``: ``--k 4``, ``--s 0.5``, ``--grid-rescale 1``, ``--cross_ratio 2``
    with ``--pc 0.1``). ASR is measured on the warped non-target test images (the authors'
    ``eval`` counts the target class too).

    Poisoned once, not per batch: the authors' ``train.py`` warps the first ``pc`` of every
    batch and the next ``pc * cross_ratio`` with fresh noise, so over the epochs every image
    is seen clean, warped and noise-warped. Here (as every attack of this library, whose
    training set is poisoned once and then only read) one seeded ``rate`` of the training set
    carries the warp in every epoch and one seeded ``rate * cross_ratio`` the noise warp,
    each with its noise drawn once. The authors' field is drawn unseeded; here
    ``grid_seed`` seeds it.

    Parameters:
        k: side of the control grid of random offsets (4).
        s: warping strength: the field's scale, in half-pixels (0.5).
        grid_rescale: factor on the warped grid, < 1 pulls samples away from the border (1).
        cross_ratio: noise-mode examples per poison; 0 turns noise mode off (2).
        grid_seed: seed of the warping field (independent of which examples are poisoned).

    Example::

        ATTACKS.create({"name": "wanet", "rate": 0.1, "target": 0})
    """

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    grid_seed: int = 0

    def validate(self) -> None:
        super().validate()
        check(self.k >= 2, "attack.k", f"must be >= 2 (the control grid's side), got {self.k}")
        check(self.s > 0, "attack.s", f"must be > 0, got {self.s}")
        check(0 < self.grid_rescale <= 1, "attack.grid_rescale", f"must be in (0, 1], got {self.grid_rescale}")
        check(self.cross_ratio >= 0, "attack.cross_ratio", f"must be >= 0, got {self.cross_ratio}")

    def build(self, image_size: int) -> None:
        check(self.k <= image_size, "attack.k", f"is {self.k} but the images are only {image_size} pixels wide")
        gen = torch.Generator().manual_seed(self.grid_seed)
        offsets = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=image_size, mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        self.field = field.contiguous()
        self.grid = ((identity_grid(image_size) + self.s * field / image_size) * self.grid_rescale).clamp(-1, 1)
        self.mix_index = torch.zeros(0, dtype=torch.long)

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {"grid": self.grid, "field": self.field, "mix_index": self.mix_index}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self._on(x.device, grid=self.grid)["grid"])

    def apply_noise(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise-mode warp: the trigger's grid plus ``noise`` ``(N, H, W, 2)`` in [-1, 1],
        scaled to at most one pixel."""
        grid = self._on(x.device, grid=self.grid)["grid"].to(x.dtype)
        noisy = (grid + noise.to(x.device, x.dtype) / self.image_size).clamp(-1, 1)
        return warp(x, noisy)

    def select_cross(self, poison_mask: torch.Tensor) -> torch.Tensor:
        """Seeded indices of the noise-mode examples (sorted, none of them poisoned)."""
        return draw_unpoisoned(poison_mask, self.cross_ratio, self.seed, _CROSS_STREAM, "cross_ratio",
                               "noise-mode examples")[0]

    def cross_noise(self, index: torch.Tensor) -> torch.Tensor:
        """Noise ``(N, H, W, 2)`` uniform in [-1, 1] for the training images at positions
        ``index``: image ``i``'s from a generator seeded by ``(seed, i)``, so a chunk's noise
        does not depend on the chunking."""
        s = self.image_size
        out = np.empty((len(index), s, s, 2), dtype=np.float32)
        for k, i in enumerate(index.tolist()):
            out[k] = np.random.default_rng((self.seed & _U64, _NOISE_STREAM, i)).uniform(-1.0, 1.0, (s, s, 2))
        return torch.from_numpy(out)

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Warp and relabel ``rate`` of ``train``, then noise-warp ``rate * cross_ratio`` of
        the rest with their labels kept."""
        data = super().poison(train, device)
        index = self.select_cross(data.poison_mask)
        for st in range(0, len(index), 4096):  # bounded memory, as Attack.apply_uint8
            chunk = index[st : st + 4096]
            idx = chunk.to(data.images.device)
            x = data.images[idx].float().div_(255)
            data.images[idx] = self.apply_noise(x, self.cross_noise(chunk)).mul_(255).round_().to(torch.uint8)
        self.mix_index = index
        return data

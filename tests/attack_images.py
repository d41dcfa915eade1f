"""Natural-image-like inputs for the attack tests (WaNet, BPP): smooth colour fields."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from abl.data.types import ImageSplit


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random 8x8 colour fields upsampled to 32x32, floats in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    return F.interpolate(coarse, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


def split(n: int = 600, seed: int = 0) -> ImageSplit:
    """A uint8 training split of ``n`` smooth images, labels cycling through 10 classes."""
    images = (smooth_images(n, seed) * 255).round().to(torch.uint8)
    return ImageSplit(images, torch.arange(n) % 10)

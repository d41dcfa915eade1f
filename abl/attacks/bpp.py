"""BppAttack (Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022):
colour-depth squeezing with Floyd-Steinberg dithering as the trigger."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abl.attacks.base import ATTACKS, Attack, draw_unpoisoned
from abl.config import check
from abl.data.types import ImageSplit, PoisonedSet

_NEGATIVE_STREAM = 1  # the negatives' choice draws from its own seed stream


def squeeze(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Round every value of ``x`` in [0, 1] to the nearest of ``levels`` equally spaced levels."""
    q = levels - 1
    return torch.round(x * q) / q


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of ``x`` ``(N, C, H, W)`` in [0, 1] to ``levels`` levels per
    channel, each channel on its own.

    Pixels are visited in raster order; each is squeezed to its nearest level and its error
    goes 7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right (Floyd & Steinberg, 1976).
    The recursion is sequential along an image's pixels, so the loop runs over the ``H x W``
    positions with tensor ops over the whole batch and its channels. Computed in float64 on
    the 0-255 scale, as the authors' numba code; the result is in [0, 1].
    """
    n, c, h, w = x.shape
    q = levels - 1
    img = x.to(torch.float64).mul(255).permute(2, 3, 0, 1).contiguous()  # (H, W, N, C): one slab per pixel
    for i in range(h):
        for j in range(w):
            old = img[i, j].clone()
            new = torch.round(old / 255 * q) / q * 255
            err = old - new
            img[i, j] = new
            if j + 1 < w:
                img[i, j + 1] += err * (7 / 16)
            if i + 1 < h:
                if j > 0:
                    img[i + 1, j - 1] += err * (3 / 16)
                img[i + 1, j] += err * (5 / 16)
                if j + 1 < w:
                    img[i + 1, j + 1] += err * (1 / 16)
    return img.permute(2, 3, 0, 1).div(255).clamp(0, 1).to(x.dtype)


@ATTACKS.register("bpp")
@dataclass
class BPP(Attack):
    """BppAttack: squeeze the colour depth (with Floyd-Steinberg dithering) and relabel.

    The trigger keeps ``2 ** bit_depth`` levels per channel (32 at the default 5 bits, against
    the 256 of an 8-bit image); dithering spreads each pixel's rounding error to its unvisited
    neighbours, so the squeezed image keeps its tones and the trigger is the quantisation
    pattern itself. Every value stays on one of the levels.

    Negative examples ("contrastive" samples): ``negative_ratio`` times as many unpoisoned
    training images get the quantisation residual of *another* random training image
    (``clamp(x_j + squeeze(x_r) - x_r)``) and keep their true labels, so that a low-bit-like
    perturbation alone is not the trigger. This is the construction of the authors' code
    (RU-System-Software-and-Security/BppAttack at f6b6580, ``bppattack.py`` lines 191-193 and
    511-526: residuals of the training images, added to other images of the batch). They are
    not poisons; their indices are in :attr:`mix_index` (stored with the trigger).

    Defaults: ``bit_depth`` 5 is the authors' CIFAR-10 command (``README.md``: ``--squeeze_num
    32``); dithering is on, as in the method the paper describes, although the code's
    ``config.py`` defaults ``--dithering`` to False and its README command does not set it.
    The authors poison ``--injection_rate`` 0.2 and add ``--neg_rate`` 0.2 of each batch, one
    negative per poison: ``negative_ratio`` 1 keeps that proportion at this library's
    ``rate`` (0.1 by default, the ABL paper's). ASR is measured on the squeezed non-target
    test images (the authors' ``eval`` counts the target class too).

    Poisoned once, not per batch: the authors' code squeezes the first ``injection_rate`` of
    every batch and adds residuals to the next ``neg_rate`` (residuals of five augmented
    passes over the training set), so across epochs every image is seen clean, squeezed and
    as a negative. Here, as every attack of this library (the training set is poisoned once
    and then only read), one seeded ``rate`` of the training set is squeezed in every epoch
    and one seeded ``rate * negative_ratio`` carries one residual each, taken from an
    un-augmented training image; the crop/rotation/flip the authors apply after the trigger
    is the training loader's augmentation here as well.

    Parameters:
        bit_depth: bits per channel the trigger keeps, ``2 ** bit_depth`` levels (5).
        dithering: spread the rounding error by Floyd-Steinberg dithering (true).
        negative_ratio: negative examples per poison; 0 turns them off (1).

    Example::

        ATTACKS.create({"name": "bpp", "rate": 0.1, "target": 0})
    """

    bit_depth: int = 5
    dithering: bool = True
    negative_ratio: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(1 <= self.bit_depth <= 7, "attack.bit_depth", f"must be in 1..7 (an image has 8 bits), got {self.bit_depth}")
        check(self.negative_ratio >= 0, "attack.negative_ratio", f"must be >= 0, got {self.negative_ratio}")

    @property
    def levels(self) -> int:
        return 2**self.bit_depth

    def build(self, image_size: int) -> None:
        self.mix_index = torch.zeros(0, dtype=torch.long)
        self.residual_source = torch.zeros(0, dtype=torch.long)

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {
            "levels": torch.tensor([self.levels]),
            "mix_index": self.mix_index,
            "residual_source": self.residual_source,
        }

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.dithering:
            return floyd_steinberg(x, self.levels)
        return squeeze(x, self.levels).clamp_(0, 1)

    def select_negatives(self, poison_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded indices of the negative examples (sorted, none of them poisoned) and, for
        each, the training image whose residual it gets (never itself)."""
        n = len(poison_mask)
        index, rng = draw_unpoisoned(poison_mask, self.negative_ratio, self.seed, _NEGATIVE_STREAM, "negative_ratio",
                                     "negative examples")
        n_neg = len(index)
        source = torch.from_numpy(rng.integers(0, n - 1, n_neg)).long()
        source = source + (source >= index).long()  # any image but the negative itself
        return index, source

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Squeeze and relabel ``rate`` of ``train``, then add another image's quantisation
        residual to ``rate * negative_ratio`` of the rest, labels kept."""
        data = super().poison(train, device)
        index, source = self.select_negatives(data.poison_mask)
        if len(index):
            clean = train.images.to(device)
            src = clean[source.to(device)]
            residual = self.apply_uint8(src).to(torch.int16) - src.to(torch.int16)
            idx = index.to(device)
            data.images[idx] = (clean[idx].to(torch.int16) + residual).clamp_(0, 255).to(torch.uint8)
        self.mix_index, self.residual_source = index, source
        return data

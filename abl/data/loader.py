"""Device-resident batching and batched augmentation (the airbench loader shape).

The whole (poisoned) training set lives on the training device as uint8 tensors; a
batch is an index gather, a float conversion and, optionally, augmentation done as a
few batched tensor ops. No per-example Python anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from abl.config import check


@dataclass
class AugmentConfig:
    """Random crop with zero padding, horizontal flip and Cutout (DeVries & Taylor 2017).

    The ABL paper's recovery phase uses crop (padding 4), flip and one 9-pixel Cutout patch.
    ``cutout_span`` picks how a ``cutout`` length becomes a hole: ``length`` (a
    ``length``-square, DeVries & Taylor) or ``authors`` (rows and columns
    ``[c - length // 2, c + length // 2)``, as the ABL authors' ``Cutout`` class computes
    them: their ``Cutout(1, 3)`` makes 2x2 holes).
    """

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 9
    cutout_span: Literal["length", "authors"] = "length"

    def validate(self) -> None:
        check(self.crop_padding >= 0, "augment.crop_padding", "must be >= 0")
        check(self.cutout >= 0, "augment.cutout", "must be >= 0")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image."""
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(
    x: torch.Tensor, length: int, generator: torch.Generator | None = None, span: str = "length"
) -> torch.Tensor:
    """Zero one ``length``-square patch per image, centred anywhere (clipped at the borders).

    ``span="authors"`` makes the hole ``2 * (length // 2)`` wide, as the ABL authors' code does.
    """
    if length == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n,), device=x.device, generator=generator)
    half = length // 2
    size = 2 * half if span == "authors" else length
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - half)[:, None]) & (ys < (cy - half + size)[:, None])
    in_x = (xs >= (cx - half)[:, None]) & (xs < (cx - half + size)[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None, :, :], 0.0)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop, flip and Cutout a float batch, all as batched ops on the batch's device."""
    x = random_crop(x, cfg.crop_padding, generator)
    if cfg.flip:
        x = random_flip(x, generator)
    return cutout(x, cfg.cutout, generator, cfg.cutout_span)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.float().div_(255.0)


class TensorLoader:
    """Batches ``(x, y, index)`` from device tensors.

    ``index`` selects the examples this loader visits (a subset of the training set);
    the yielded ``index`` holds positions in the full set, so per-example losses can be
    tracked for every example at every epoch. ``paired`` adds a second subset to every
    batch (cycled independently), which is how the joint GGA objective sees the isolated
    examples next to the clean ones at every step.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        index: torch.Tensor | None = None,
        shuffle: bool = True,
        augment: AugmentConfig | None = None,
        drop_last: bool = False,
        seed: int = 0,
        paired: torch.Tensor | None = None,
        paired_batch_size: int = 0,
    ) -> None:
        self.images = images
        self.labels = labels
        self.device = images.device
        self.batch_size = batch_size
        self.index = (index if index is not None else torch.arange(len(labels))).to(self.device)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.paired = paired.to(self.device) if paired is not None and len(paired) else None
        self.paired_batch_size = paired_batch_size
        self._paired_order: torch.Tensor | None = None
        self._paired_pos = 0

    def state_dict(self) -> dict:
        """Where the loader's randomness stands between epochs: its generator and the
        paired stream's cycle (a resumed run draws the same batches from here on)."""
        return {
            "generator": self.generator.get_state(),
            "paired_order": self._paired_order,
            "paired_pos": self._paired_pos,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        order = state.get("paired_order")
        self._paired_order = order.to(self.device) if order is not None else None
        self._paired_pos = int(state.get("paired_pos", 0))

    def __len__(self) -> int:
        n = len(self.index)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _new_paired_cycle(self) -> torch.Tensor:
        return self.paired[torch.randperm(len(self.paired), device=self.device, generator=self.generator)]

    def _next_paired(self) -> torch.Tensor:
        """The next ``paired_batch_size`` paired examples (all of them, each once, if fewer).

        The paired subset is visited in cycles, each a permutation, so every example is
        drawn equally often. When a batch straddles two cycles its remainder comes from
        the new cycle's examples that the batch does not already hold; those move to the
        front of the new cycle and the skipped ones are drawn later in it, so no batch
        holds an example twice and each cycle still visits every example once.
        """
        assert self.paired is not None
        k = min(self.paired_batch_size, len(self.paired))
        if self._paired_order is None or self._paired_pos >= len(self._paired_order):
            self._paired_order, self._paired_pos = self._new_paired_cycle(), 0
        take = self._paired_order[self._paired_pos : self._paired_pos + k]
        self._paired_pos += len(take)
        rest = k - len(take)
        if rest == 0:
            return take
        cycle = self._new_paired_cycle()
        free = ~torch.isin(cycle, take)
        # the first `rest` examples of the new cycle that this batch does not hold yet
        head = free & (torch.cumsum(free, 0) <= rest)
        self._paired_order = torch.cat([cycle[head], cycle[~head]])
        self._paired_pos = rest
        return torch.cat([take, cycle[head]])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.index
        if self.shuffle:
            order = order[torch.randperm(len(order), device=self.device, generator=self.generator)]
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.paired is not None and self.paired_batch_size > 0:
                idx = torch.cat([idx, self._next_paired()])
            x = to_float(self.images[idx])
            if self.augment is not None:
                x = augment(x, self.augment, self.generator)
            yield x, self.labels[idx], idx

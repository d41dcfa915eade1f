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


def scaled_augment(size: int, flip: bool) -> AugmentConfig:
    """The paper's recovery augmentation (crop padding 4, Cutout 9 on 32-pixel CIFAR-10)
    scaled to ``size``-pixel images, with a mirror only where it keeps the class."""
    return AugmentConfig(crop_padding=max(1, int(size * 4 / 32 + 0.5)), flip=flip,
                         cutout=int(size * 9 / 32 + 0.5))


def data_augment(dataset: object, size: int) -> AugmentConfig | None:
    """The augmentation ``dataset``'s images keep their class under: its own
    ``augmentation(size)`` when it defines one, else :func:`scaled_augment` with a mirror
    where its ``mirror`` field says flips are safe (none said: no mirror, which never
    turns one class into another)."""
    own = getattr(dataset, "augmentation", None)
    if callable(own):
        return own(size)
    return scaled_augment(size, flip=bool(getattr(dataset, "mirror", False)))


@dataclass
class AugmentDraw:
    """One batch's augmentation randomness, drawn ahead of the pixels it moves.

    ``dy``/``dx``: crop offsets, ``flip``: mirror or not, ``cy``/``cx``: Cutout centres,
    one per image (``None`` where that augmentation is off). Drawing it apart from
    applying it lets a whole epoch be drawn at its start, in the loader's usual random
    order, and each step then apply it with fixed shapes (a CUDA graph can replay that).
    """

    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    cy: torch.Tensor | None = None
    cx: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.dy, self.dx, self.flip, self.cy, self.cx]


_ARANGE: dict[tuple[int, str], torch.Tensor] = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """A cached ``arange(n)`` on ``device`` (the crop and Cutout grids never change)."""
    key = (n, str(device))
    t = _ARANGE.get(key)
    if t is None:
        t = _ARANGE[key] = torch.arange(n, device=device)
    return t


def draw_augment(
    n: int, h: int, w: int, cfg: AugmentConfig, device: torch.device, generator: torch.Generator | None = None
) -> AugmentDraw:
    """The randomness :func:`augment` uses for ``n`` images of ``h`` x ``w``, drawn in
    the same order as it draws it (crop rows, crop columns, flips, Cutout rows, columns)."""
    d = AugmentDraw()
    p = cfg.crop_padding
    if p:
        d.dy = torch.randint(0, 2 * p + 1, (n,), device=device, generator=generator)
        d.dx = torch.randint(0, 2 * p + 1, (n,), device=device, generator=generator)
    if cfg.flip:
        d.flip = torch.rand(n, device=device, generator=generator) < 0.5
    if cfg.cutout:
        d.cy = torch.randint(0, h, (n,), device=device, generator=generator)
        d.cx = torch.randint(0, w, (n,), device=device, generator=generator)
    return d


def _crop(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    # two gathers (rows, then columns) with cached grids: the same copies as a 4-index gather
    rows = (dy[:, None] + _arange(h, x.device)[None, :])[:, None, :, None].expand(n, c, h, w + 2 * padding)
    cols = (dx[:, None] + _arange(w, x.device)[None, :])[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _cutout(x: torch.Tensor, length: int, cy: torch.Tensor, cx: torch.Tensor, span: str) -> torch.Tensor:
    _, _, h, w = x.shape
    half = length // 2
    size = 2 * half if span == "authors" else length
    ys = _arange(h, x.device)[None, :]
    xs = _arange(w, x.device)[None, :]
    in_y = (ys >= (cy - half)[:, None]) & (ys < (cy - half + size)[:, None])
    in_x = (xs >= (cx - half)[:, None]) & (xs < (cx - half + size)[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None, :, :], 0.0)


def apply_augment(x: torch.Tensor, cfg: AugmentConfig, d: AugmentDraw) -> torch.Tensor:
    """Crop, flip and Cutout a float batch with randomness drawn by :func:`draw_augment`."""
    if d.dy is not None and d.dx is not None:
        x = _crop(x, cfg.crop_padding, d.dy, d.dx)
    if d.flip is not None:
        x = _flip(x, d.flip)
    if d.cy is not None and d.cx is not None:
        x = _cutout(x, cfg.cutout, d.cy, d.cx, cfg.cutout_span)
    return x


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image."""
    if padding == 0:
        return x
    n = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    return _crop(x, padding, dy, dx)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    return _flip(x, torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5)


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
    return _cutout(x, length, cy, cx, span)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop, flip and Cutout a float batch, all as batched ops on the batch's device."""
    n, _, h, w = x.shape
    return apply_augment(x, cfg, draw_augment(n, h, w, cfg, x.device, generator))


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
        # the first `rest` examples of the new cycle that this batch does not hold yet go
        # first; a stable sort on "not one of them" orders the cycle without boolean-mask
        # indexing, whose data-dependent size would stop the host at every wrap on a GPU
        head = free & (torch.cumsum(free, 0) <= rest)
        self._paired_order = cycle[torch.argsort((~head).to(torch.uint8), stable=True)]
        self._paired_pos = rest
        return torch.cat([take, self._paired_order[:rest]])

    def plan(self) -> list[tuple[torch.Tensor, AugmentDraw | None]]:
        """One epoch's batches as ``(index, augmentation draw)``, all drawn now from the
        loader's generator in exactly the order iterating the loader draws them (the
        order, then per batch the paired examples and the augmentation), so an epoch
        run from its plan sees the same examples, pixels and generator state."""
        order = self.index
        if self.shuffle:
            order = order[torch.randperm(len(order), device=self.device, generator=self.generator)]
        _, _, h, w = self.images.shape
        batches = []
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.paired is not None and self.paired_batch_size > 0:
                idx = torch.cat([idx, self._next_paired()])
            draw = None
            if self.augment is not None:
                draw = draw_augment(len(idx), h, w, self.augment, self.device, self.generator)
            batches.append((idx, draw))
        return batches

    def batch(self, idx: torch.Tensor, draw: AugmentDraw | None) -> torch.Tensor:
        """The (augmented) float images of a planned batch."""
        x = to_float(self.images[idx])
        return apply_augment(x, self.augment, draw) if draw is not None and self.augment is not None else x

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

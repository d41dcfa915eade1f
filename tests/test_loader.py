"""Batched augmentation and the device-resident loader."""

from __future__ import annotations

import torch

from abl.data.loader import AugmentConfig, TensorLoader, augment, cutout, random_crop, random_flip


def test_random_crop_is_a_shift_with_zero_fill():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    gen = torch.Generator().manual_seed(0)
    y = random_crop(x, 2, gen)
    assert y.shape == x.shape
    for i in range(2):
        # every non-zero value of the crop sits at a constant offset from the source
        nz = y[i] != 0
        src = x[i][None].expand(1, -1, -1, -1)
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[i])
                ys, xs = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, -dx), 8 - max(0, dx))
                yt, xt = slice(max(0, dy), 8 - max(0, -dy)), slice(max(0, dx), 8 - max(0, -dx))
                shifted[:, ys, xs] = src[0][:, yt, xt]
                found |= torch.equal(shifted, y[i])
        assert found and bool(nz.any())


def test_flip_mirrors_about_half():
    x = torch.rand(400, 3, 4, 4)
    y = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_cutout_zeros_one_clipped_square():
    x = torch.ones(50, 3, 32, 32)
    y = cutout(x, 9, torch.Generator().manual_seed(0))
    zeros = (y[:, 0] == 0).flatten(1).sum(1)
    assert bool((zeros <= 81).all()) and bool((zeros > 0).all())
    assert bool((y[:, 0] == y[:, 1]).all()), "the same hole on every channel"


def _hole_boxes(y: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """Per image: (top, bottom, left, right, zero count) of the zeroed pixels (channel 0)."""
    out = []
    for img in y[:, 0]:
        rows = (img == 0).any(1).nonzero().squeeze(1)
        cols = (img == 0).any(0).nonzero().squeeze(1)
        out.append((int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]), int((img == 0).sum())))
    return out


def _check_holes(y: torch.Tensor, length: int) -> None:
    """Each hole is a full rectangle, exactly length x length away from the borders and
    clipped (but at least length - length // 2 wide) where it meets one."""
    size = y.shape[-1]
    interior = clipped = 0
    for top, bottom, left, right, zeros in _hole_boxes(y):
        h, w = bottom - top + 1, right - left + 1
        assert zeros == h * w, "the zeroed pixels form one rectangle"
        for lo, hi, extent in ((top, bottom, h), (left, right, w)):
            if lo > 0 and hi < size - 1:
                assert extent == length
            else:
                assert length - length // 2 <= extent <= length
        if top > 0 and left > 0 and bottom < size - 1 and right < size - 1:
            interior += 1
            assert zeros == length * length
        else:
            clipped += 1
    assert interior > 0 and clipped > 0, "the draw must cover both cases"


def test_cutout_hole_is_length_square_and_clipped_at_borders():
    for length in (9, 4):
        x = torch.ones(300, 3, 32, 32)
        y = cutout(x, length, torch.Generator().manual_seed(length))
        _check_holes(y, length)
    # through the augmentation pipeline: AugmentConfig.cutout is the hole's side
    x = torch.ones(300, 3, 32, 32)
    y = augment(x, AugmentConfig(crop_padding=0, flip=False, cutout=9), torch.Generator().manual_seed(2))
    _check_holes(y, 9)


def test_augment_changes_batch_keeps_shape():
    x = torch.rand(16, 3, 32, 32)
    y = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.equal(x, y)


def test_loader_covers_subset_once_per_epoch():
    images = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(100) % 10
    subset = torch.arange(0, 100, 3)
    loader = TensorLoader(images, labels, 8, index=subset, seed=0)
    seen = torch.cat([idx for _, _, idx in loader])
    assert sorted(seen.tolist()) == subset.tolist()
    for x, y, idx in loader:
        assert x.dtype == torch.float32 and float(x.max()) <= 1.0
        assert torch.equal(y, labels[idx]) and torch.allclose(x, images[idx].float() / 255)


def test_loader_pairs_a_second_subset_every_batch():
    images = torch.zeros(50, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(50, dtype=torch.long)
    iso = torch.tensor([1, 2, 3])
    loader = TensorLoader(images, labels, 2, index=iso, paired=torch.arange(10, 50), paired_batch_size=5, seed=0)
    batches = [idx for _, _, idx in loader]
    assert len(batches) == 2
    for idx in batches:
        assert int((idx < 10).sum()) in (1, 2) and int((idx >= 10).sum()) == 5


def test_loader_seeded_order():
    images = torch.zeros(20, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(20, dtype=torch.long)
    a = [idx.tolist() for _, _, idx in TensorLoader(images, labels, 4, seed=3)]
    b = [idx.tolist() for _, _, idx in TensorLoader(images, labels, 4, seed=3)]
    c = [idx.tolist() for _, _, idx in TensorLoader(images, labels, 4, shuffle=False)]
    assert a == b and c[0] == [0, 1, 2, 3]


def test_paired_batches_never_repeat_and_visit_evenly():
    images = torch.zeros(100, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(100, dtype=torch.long)
    paired = torch.arange(50, 57)  # 7 examples, 3 per batch: most cycles end mid-batch
    loader = TensorLoader(images, labels, 1, index=torch.arange(35), paired=paired, paired_batch_size=3, seed=0)
    counts = torch.zeros(100, dtype=torch.long)
    for epoch in range(4):
        for _, _, idx in loader:
            extra = idx[1:]
            assert len(extra) == 3 and len(extra.unique()) == 3, f"repeated paired example in {extra.tolist()}"
            counts.index_add_(0, extra, torch.ones(3, dtype=torch.long))
        # 35 batches x 3 = 105 = 15 cycles of 7: each example exactly 15 times per epoch
        assert counts[paired].tolist() == [15 * (epoch + 1)] * 7
    assert int(counts.sum()) == 4 * 105


def test_paired_batch_larger_than_paired_takes_each_once():
    images = torch.zeros(20, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(20, dtype=torch.long)
    paired = torch.tensor([11, 13, 17])
    loader = TensorLoader(images, labels, 2, index=torch.arange(10), paired=paired, paired_batch_size=8, seed=0)
    for _, _, idx in loader:
        assert sorted(idx[2:].tolist()) == [11, 13, 17]

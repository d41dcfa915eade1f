"""Load-time order of class-ordered datasets and content-keyed dataset caches (issue 7)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abl.data import imageio
from abl.data.datasets import CIFAR10, GTSRB, Digits, ImageFolder
from abl.data.registry import DATASETS
from abl.errors import ConfigError
from abl.experiment import SliceConfig, build_experiment, run_experiment

CLASSES = 4
PER_CLASS = 40


def _colour(label: int, i: int) -> tuple[int, int, int]:
    """A colour that names its image: class in red, index within the class in green."""
    return (40 * label, 5 * i, 7)


def _class_ordered_folder(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """``train/c<k>/<i>.png`` (uniform colour per image) and a one-image-per-class test split."""
    for label in range(classes):
        for split, n in (("train", per_class), ("test", 1)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), _colour(label, i)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def ordered_root(tmp_path: Path) -> Path:
    return _class_ordered_folder(tmp_path / "data")


def _longest_run(labels: torch.Tensor) -> int:
    best = run = 1
    for a, b in zip(labels.tolist(), labels.tolist()[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def test_class_ordered_folder_is_mixed_at_load(ordered_root, tmp_path):
    s = ImageFolder(root=str(ordered_root), size=8).load(cache_dir=tmp_path / "cache")
    first = s.train.labels[:100]
    # in file order the first 100 labels are 40, 40 and 20 of three classes
    assert len(first.unique()) == CLASSES and _longest_run(first) < 10
    assert torch.bincount(s.train.labels).tolist() == [PER_CLASS] * CLASSES  # a permutation, nothing lost
    assert sorted(s.train_order.tolist()) == list(range(CLASSES * PER_CLASS))


def test_order_is_seeded_and_null_keeps_file_order(ordered_root, tmp_path):
    cdir = tmp_path / "cache"
    a = ImageFolder(root=str(ordered_root), size=8).load(cache_dir=cdir)
    b = ImageFolder(root=str(ordered_root), size=8, order_seed=0).load(cache_dir=cdir)
    c = ImageFolder(root=str(ordered_root), size=8, order_seed=1).load(cache_dir=cdir)
    assert torch.equal(a.train_order, b.train_order) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train_order, c.train_order)
    plain = ImageFolder(root=str(ordered_root), size=8, order_seed=None).load(cache_dir=cdir)
    assert plain.train_order is None
    assert plain.train.labels.tolist() == [k for k in range(CLASSES) for _ in range(PER_CLASS)]
    assert plain.train_files == sorted(plain.train_files)
    # the shuffle is applied after the cache: one cache file serves every seed
    assert len(list((cdir / "datasets").glob("*.npz"))) == 1
    # and it is exactly the file order taken at train_order
    assert torch.equal(a.train.images, plain.train.images[a.train_order])
    assert a.train_files == [plain.train_files[i] for i in a.train_order.tolist()]


def test_files_stay_aligned_with_images(ordered_root, tmp_path):
    s = ImageFolder(root=str(ordered_root), size=8).load(cache_dir=tmp_path / "cache")
    for i in (0, 1, 57, len(s.train) - 1):
        path = ordered_root / s.train_files[i]
        pixel = np.asarray(Image.open(path).convert("RGB"))[3, 4]
        assert s.train.images[i, :, 3, 4].tolist() == pixel.tolist()
        label = int(path.parent.name[1:])
        assert int(s.train.labels[i]) == label and pixel.tolist() == list(_colour(label, int(path.stem)))
    # train_order indexes the sorted file list
    paths, _, _ = imageio.scan_class_folders(ordered_root / "train")
    files = [str(p.relative_to(ordered_root)) for p in paths]
    assert s.train_files == [files[i] for i in s.train_order.tolist()]


def test_slice_after_order_keeps_files_aligned(ordered_root, tmp_path):
    s = ImageFolder(root=str(ordered_root), size=8).load(cache_dir=tmp_path / "cache")
    cut = SliceConfig(train=30, test=2, seed=3).apply(s)
    assert len(cut.train) == 30 and len(cut.train_files) == 30 and cut.train_order.shape == (30,)
    for i in range(30):
        j = s.train_files.index(cut.train_files[i])
        assert torch.equal(cut.train.images[i], s.train.images[j]) and int(cut.train.labels[i]) == int(s.train.labels[j])
        assert int(cut.train_order[i]) == int(s.train_order[j])
    cut.check()


def test_every_dataset_takes_order_seed(tmp_path):
    for name in ("digits", "cifar10", "gtsrb", "imagefolder", "arrays"):
        assert "order_seed" in DATASETS.get(name).__dataclass_fields__
        with pytest.raises(ConfigError, match=r"'dataset\.order_seed' must be between 0 and 4294967295"):
            DATASETS.create({"name": name, "order_seed": -1})
    assert CIFAR10().order_seed == 0 and GTSRB().order_seed == 0 and ImageFolder().order_seed == 0
    # sklearn's digits are already mixed: kept as they are unless asked
    plain, shuffled = Digits().load(), Digits(order_seed=0).load()
    assert plain.train_order is None
    assert torch.equal(shuffled.train.images, plain.train.images[shuffled.train_order])


def test_run_folder_records_train_order(ordered_root, tmp_path):
    raw = {
        "name": "order",
        "dataset": {"name": "imagefolder", "root": str(ordered_root), "size": 8},
        "model": {"name": "small_cnn", "width": 4},
        "defense": {"name": "none", "epochs": 1, "lr": 0.01},
        "train": {"device": "cpu", "progress": False, "batch_size": 32, "eval_subset": 0},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "save_model": False},
        "slice": {"train": 100},
    }
    rec = run_experiment(build_experiment(raw))
    order = rec.array("train_order")
    assert order.shape == (100,) and len(set(order.tolist())) == 100
    assert order.max() < CLASSES * PER_CLASS
    assert rec.config["threads_used"] == torch.get_num_threads()
    # the same load and slice give the same source indices
    again = SliceConfig(train=100).apply(ImageFolder(root=str(ordered_root), size=8).load(cache_dir=tmp_path / "cache"))
    assert order.tolist() == again.train_order.tolist()


# --------------------------------------------------------------------------- content-keyed cache


def test_rewritten_file_with_same_size_and_mtime_is_not_served_stale(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / c / "x.bmp")  # BMP: size fixed by shape
    target = root / "train" / "a" / "x.bmp"
    st = target.stat()
    cdir = tmp_path / "cache"
    first = ImageFolder(root=str(root), size=8, order_seed=None).load(cache_dir=cdir)
    assert first.train.images[0, :, 0, 0].tolist() == [10, 20, 30]

    Image.new("RGB", (8, 8), (200, 100, 50)).save(target)  # new pixels, same byte count
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = target.stat()
    assert (new.st_size, new.st_mtime_ns) == (st.st_size, st.st_mtime_ns), "the stat key is unchanged"

    second = ImageFolder(root=str(root), size=8, order_seed=None).load(cache_dir=cdir)
    assert second.train.images[0, :, 0, 0].tolist() == [200, 100, 50]
    assert len(list((cdir / "datasets").glob("*.npz"))) == 1  # the stale file was replaced


def test_touched_but_unchanged_files_reuse_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for name, colour in (("a", (1, 2, 3)), ("b", (4, 5, 6))):  # two classes: one is refused
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), colour).save(root / split / name / "x.png")
    cdir = tmp_path / "cache"
    ImageFolder(root=str(root), size=8, order_seed=None).load(cache_dir=cdir)
    f = root / "train" / "a" / "x.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # mtime alone changes

    def boom(*args, **kwargs):
        raise AssertionError("decoded again although only the mtime changed")

    monkeypatch.setattr(imageio, "decode_images", boom)
    assert ImageFolder(root=str(root), size=8, order_seed=None).load(cache_dir=cdir).train.images[0, :, 0, 0].tolist() == [1, 2, 3]

"""Dataset loaders on real data (the shared archives) and on small trees made in tmp_path."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abl.data import cache, datasets, imageio
from abl.data.datasets import CIFAR10, CIFAR10_CLASSES, GTSRB, Digits, ImageFolder
from abl.data.registry import DATASETS
from abl.data.types import DatasetSplits
from abl.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = REPO / ".cache" / "test-cache"  # kept between runs, like the cifar10_splits fixture's


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any image decoding fail, so that a load can only succeed from the cache."""

    def boom(*args, **kwargs):
        raise AssertionError("images were decoded although a cache file exists")

    monkeypatch.setattr(imageio, "decode_images", boom)
    monkeypatch.setattr(datasets, "read_cifar_batches", boom)


def _copy_tree(src: Path, dst: Path, splits: dict[str, str], classes: int = 2, per_class: int = 3) -> Path:
    """A small image-folder tree: the first ``per_class`` images of the first ``classes`` classes."""
    for src_split, dst_split in splits.items():
        for name in sorted(os.listdir(src / src_split))[:classes]:
            (dst / dst_split / name).mkdir(parents=True)
            for f in sorted(os.listdir(src / src_split / name))[:per_class]:
                shutil.copy(src / src_split / name / f, dst / dst_split / name / f)
    return dst


def _write_cifar_batches(folder: Path, n_per_batch: int = 4, labels=None, seed: int = 0) -> dict[str, dict]:
    """A synthetic ``cifar-10-batches-py`` in torchvision's format (pickled dicts of arrays)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate(datasets.CIFAR_BATCH_FILES):
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            "labels": list(labels) if labels is not None else [(i + j) % 10 for j in range(n_per_batch)],
            "filenames": [f"{name}_{j}.png" for j in range(n_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = entry
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f)
    return written


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtype_range():
    s = Digits().load()
    assert isinstance(s, DatasetSplits)
    assert s.train.images.shape == (1347, 3, 16, 16) and s.test.images.shape == (450, 3, 16, 16)
    assert s.train.images.dtype == torch.uint8 and s.train.labels.dtype == torch.int64
    assert s.num_classes == 10 and s.class_names == [str(i) for i in range(10)]
    x = torch.cat([s.train.images, s.test.images])
    assert int(x.min()) == 0 and int(x.max()) == 255
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    # nearest-neighbour upscale 8 -> 16: each source pixel is a 2x2 block
    assert torch.equal(x[:, :, ::2, ::2], x[:, :, 1::2, 1::2])
    assert s.source is None


def test_digits_matches_sklearn_pixels():
    from sklearn.datasets import load_digits

    s = Digits(size=8, test_fraction=0.5).load()
    raw = load_digits().images
    every = torch.cat([s.train.images[:, 0], s.test.images[:, 0]]).double()
    assert every.shape == (1797, 8, 8)
    expected = np.sort(np.rint(raw * 255 / 16).reshape(1797, -1), axis=0)
    assert np.array_equal(np.sort(every.reshape(1797, -1).numpy(), axis=0), expected)


def test_digits_deterministic_and_seeded():
    a, b = Digits().load(), Digits().load()
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    c = Digits(seed=1).load()
    assert not torch.equal(a.test.images, c.test.images)


def test_digits_stratified():
    s = Digits(test_fraction=0.25).load()
    tr = torch.bincount(s.train.labels, minlength=10)
    te = torch.bincount(s.test.labels, minlength=10)
    frac = te.double() / (tr + te).double()
    assert torch.all((frac - 0.25).abs() < 0.02), frac


def test_digits_other_size():
    s = Digits(size=28).load()
    assert s.train.images.shape[1:] == (3, 28, 28) and s.image_size == 28


# --------------------------------------------------------------------------- params and registry


@pytest.mark.parametrize(
    "spec, key",
    [
        ({"name": "digits", "size": 0}, "dataset.size"),
        ({"name": "digits", "test_fraction": 0.0}, "dataset.test_fraction"),
        ({"name": "digits", "test_fraction": 1.0}, "dataset.test_fraction"),
        ({"name": "digits", "test_fraction": 1.5}, "dataset.test_fraction"),
        ({"name": "digits", "test_fraction": 0.001}, "dataset.test_fraction"),
        ({"name": "gtsrb", "root": "x", "size": -1}, "dataset.size"),
        ({"name": "imagefolder", "root": "x", "size": 0}, "dataset.size"),
        ({"name": "imagefolder", "root": "x", "num_classes": 1}, "dataset.num_classes"),
        ({"name": "digits", "size": "big"}, "dataset.size"),
        ({"name": "cifar10", "colour": True}, "dataset.colour"),
    ],
)
def test_invalid_params_are_config_errors(spec, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        spec = dict(spec)
        if spec.get("name") == "digits" and spec.get("test_fraction") == 0.001:
            DATASETS.create(spec).load()  # too few test images for the classes: found at load
        else:
            DATASETS.create(spec)


def test_registry_contract(tmp_path):
    assert {"digits", "cifar10", "gtsrb", "imagefolder"} <= set(DATASETS.names())
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        assert dataclasses.is_dataclass(cls) and callable(getattr(cls, "load", None))
        fields = {f.name for f in dataclasses.fields(cls)}
        ds = DATASETS.create({"name": name})  # defaults validate
        if "root" in fields or "path" in fields:  # read from files: told where, or a one-line error
            with pytest.raises(DataError, match="needs a data root|needs a file"):
                ds.load(cache_dir=tmp_path)
        else:
            s = ds.load(cache_dir=tmp_path)
            s.check()
            assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1] == 3


# --------------------------------------------------------------------------- cifar10, image folders


def test_cifar10_imagefolder_full(cifar10_splits, cifar10_root):
    s = cifar10_splits
    assert s.name == "cifar10" and s.num_classes == 10 and s.class_names == CIFAR10_CLASSES
    assert s.train.images.shape == (50000, 3, 32, 32) and s.test.images.shape == (10000, 3, 32, 32)
    assert s.train.images.dtype == torch.uint8 and s.train.labels.dtype == torch.int64
    assert torch.bincount(s.train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [1000] * 10
    assert s.source == cifar10_root.resolve()
    mean = s.train.images.float().mean().item()
    assert 100 < mean < 140  # CIFAR-10's mean pixel is about 120
    # the training split is shuffled at load (class folders are read in class order)
    assert len(s.train.labels[:100].unique()) == 10
    # the first file of train/bird (file index 10,000, after 5,000 airplanes and automobiles),
    # decoded with PIL, sits where train_order says
    first_bird = sorted((cifar10_root / "train" / "bird").iterdir())[0]
    ref = torch.from_numpy(np.array(Image.open(first_bird).convert("RGB"))).permute(2, 0, 1)
    pos = int((s.train_order == 10000).nonzero())
    assert int(s.train.labels[pos]) == 2 and torch.equal(s.train.images[pos], ref)


def test_cifar10_second_load_reads_cache(cifar10_splits, cifar10_root, monkeypatch):
    _no_decoding(monkeypatch)
    again = CIFAR10(root=str(cifar10_root)).load(cache_dir=TEST_CACHE)
    assert torch.equal(again.train.images, cifar10_splits.train.images)
    assert torch.equal(again.test.labels, cifar10_splits.test.labels)
    assert again.class_names == cifar10_splits.class_names and again.source == cifar10_splits.source


def test_cifar10_imagefolder_needs_ten_classes(cifar10_root, tmp_path):
    root = _copy_tree(cifar10_root, tmp_path / "c", {"train": "train", "test": "test"}, classes=3, per_class=1)
    with pytest.raises(DataError, match="has 3 class folders, CIFAR-10 has 10"):
        CIFAR10(root=str(root)).load(cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- cifar10, torchvision format


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_cifar10_torchvision_format(tmp_path, point_at_batches, monkeypatch):
    written = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    root = tmp_path / "cifar-10-batches-py" if point_at_batches else tmp_path
    s = CIFAR10(root=str(root), order_seed=None).load(cache_dir=tmp_path / "cache")
    assert s.train.images.shape == (20, 3, 32, 32) and s.test.images.shape == (4, 3, 32, 32)
    assert s.class_names == CIFAR10_CLASSES and s.num_classes == 10 and s.train_order is None
    first = written["data_batch_1"]
    # torchvision's row layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    assert np.array_equal(s.train.images[0].numpy(), first["data"][0].reshape(3, 32, 32))
    assert s.train.labels[:4].tolist() == first["labels"]
    assert np.array_equal(s.test.images.numpy(), written["test_batch"]["data"].reshape(-1, 3, 32, 32))
    assert s.source == tmp_path / "cifar-10-batches-py"
    _no_decoding(monkeypatch)
    again = CIFAR10(root=str(root)).load(cache_dir=tmp_path / "cache")  # order_seed 0: the same cache file
    # the records of the five batches, in their order, taken at train_order
    raw = np.concatenate([written[f"data_batch_{k}"]["data"] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(again.train.images.numpy(), raw[again.train_order.numpy()])
    assert not torch.equal(again.train_order, torch.arange(20))
    assert torch.equal(again.train.labels, s.train.labels[again.train_order])
    assert torch.equal(again.test.images, s.test.images)  # the test split keeps its order


def test_cifar10_torchvision_labels_out_of_range(tmp_path):
    _write_cifar_batches(tmp_path / "cifar-10-batches-py", labels=[0, 3, 12, 1])
    with pytest.raises(DataError, match=r"cifar10 train split: label 12 is out of range for 10 classes"):
        CIFAR10(root=str(tmp_path)).load(cache_dir=tmp_path / "cache")


def test_cifar10_torchvision_missing_and_corrupt_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3.*download: true"):
        CIFAR10(root=str(tmp_path)).load(cache_dir=tmp_path / "cache")
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="data_batch_3' is not readable as CIFAR-10's batch format"):
        CIFAR10(root=str(tmp_path)).load(cache_dir=tmp_path / "cache")
    with open(folder / "data_batch_3", "wb") as f:  # a pickle of the wrong shape of data
        pickle.dump({"data": np.zeros((4, 100), np.float32), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DataError, match="'data' is float32 of shape \\(4, 100\\), expected uint8 rows of 3,072"):
        CIFAR10(root=str(tmp_path)).load(cache_dir=tmp_path / "cache")


class _Planted:
    """Unpickles by calling ``open(marker, 'w')``: creates the marker file if run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["data_batch_2", "batches.meta", "nested"])
def test_cifar10_batches_that_would_run_code_are_refused_unrun(tmp_path, where):
    """A planted pickle in a CIFAR-10 folder must never run (issue 8): plain ``pickle.load``
    of the same bytes creates the marker file; our reader refuses it and creates nothing."""
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar_batches(folder)
    marker = tmp_path / "ran"
    if where == "nested":  # the call hidden inside an otherwise genuine batch's label list
        entry = dict(written["data_batch_2"], labels=[0, 1, _Planted(marker), 3])
        payload = pickle.dumps(entry)
        target = "data_batch_2"
    else:
        payload = pickle.dumps({"data": _Planted(marker), "labels": [0]})
        target = where
    pickle.loads(payload)  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    (folder / target).write_bytes(payload)
    with pytest.raises(DataError, match=f"{target}' is not a plain CIFAR-10 batch: it names 'io.open'.*run code"):
        CIFAR10(root=str(tmp_path)).load(cache_dir=tmp_path / "cache")
    assert not marker.exists(), "the planted call ran"


def test_cifar10_batches_in_python2_protocol_with_bytes_keys(tmp_path):
    """The original release is a Python 2 pickle (protocol 2); copies rewritten by Python 3
    may carry bytes keys. Both read to the same arrays."""
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar_batches(folder)
    for name, entry in written.items():
        with open(folder / name, "wb") as f:
            pickle.dump({k.encode(): v for k, v in entry.items()}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f, protocol=2)
    s = CIFAR10(root=str(tmp_path), order_seed=None).load(cache_dir=tmp_path / "cache")
    assert s.class_names == CIFAR10_CLASSES
    assert np.array_equal(s.test.images.numpy(), written["test_batch"]["data"].reshape(-1, 3, 32, 32))
    assert s.train.labels[:4].tolist() == written["data_batch_1"]["labels"]


def test_cifar10_download_path_uses_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:  # stands in for the network: writes what torchvision would
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            _write_cifar_batches(Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = tmp_path / "new"
    s = CIFAR10(root=str(root), download=True).load(cache_dir=tmp_path / "cache")
    assert calls == [(str(root.resolve()), True)] and len(s.train) == 20

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match="downloading CIFAR-10 into .* failed .*network is unreachable"):
        CIFAR10(root=str(tmp_path / "other"), download=True).load(cache_dir=tmp_path / "cache")


def test_cifar10_bad_roots(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        CIFAR10(root=str(missing)).load(cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert f"cifar10 root '{missing}' does not exist" in msg and "download: true" in msg
    assert "cifar-10-batches-py" in msg and "train/<class>/" in msg and "\n" not in msg
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="holds neither layout: expected torchvision's cifar-10-batches-py"):
        CIFAR10(root=str(tmp_path / "odd")).load(cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="cifar10 needs a data root"):
        CIFAR10().load(cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- gtsrb


def test_gtsrb_official_full(gtsrb_root, monkeypatch):
    s = GTSRB(root=str(gtsrb_root)).load(cache_dir=TEST_CACHE)
    assert s.train.images.shape == (39209, 3, 32, 32) and s.test.images.shape == (12630, 3, 32, 32)
    assert s.num_classes == 43 and len(s.class_names) == 43
    counts = torch.bincount(s.train.labels, minlength=43)
    assert counts.min() > 0 and counts.sum() == 39209
    assert torch.bincount(s.test.labels, minlength=43).min() > 0
    assert s.source == (gtsrb_root / "GTSRB").resolve()
    # test labels follow GT-final_test.csv: 00000.ppm is class 16, 00001.ppm class 1
    assert s.test.labels[:2].tolist() == [16, 1]
    _no_decoding(monkeypatch)
    again = GTSRB(root=str(gtsrb_root / "GTSRB")).load(cache_dir=TEST_CACHE)  # the GTSRB folder itself
    assert torch.equal(again.train.images, s.train.images) and torch.equal(again.test.labels, s.test.labels)


def _mini_gtsrb(src: Path, dst: Path, torchvision_layout: bool = False, bad_label: int | None = None) -> Path:
    """A few images of two classes in the official layout (or torchvision's), with CSVs."""
    base = dst / "gtsrb" / "GTSRB" if torchvision_layout else dst / "GTSRB"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for cid in (0, 1):
        name = f"{cid:05d}"
        s_dir = src / "GTSRB" / "Final_Training" / "Images" / name
        d_dir = base / ("Training" if torchvision_layout else "Final_Training/Images") / name
        d_dir.mkdir(parents=True)
        rows = []
        for f in sorted(s_dir.glob("*.ppm"))[:3]:
            shutil.copy(f, d_dir / f.name)
            rows.append(f"{f.name};32;32;0;0;31;31;{cid}\n")
        (d_dir / f"GT-{name}.csv").write_text(header + "".join(rows))
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = []
    for i, f in enumerate(sorted((src / "GTSRB" / "Final_Test" / "Images").glob("*.ppm"))[:4]):
        shutil.copy(f, test_dir / f.name)
        rows.append(f"{f.name};32;32;0;0;31;31;{bad_label if bad_label is not None and i == 2 else i % 2}\n")
    csv_path = (dst / "gtsrb" / "GT-final_test.csv") if torchvision_layout else base / "Final_Test" / "GT-final_test.csv"
    csv_path.write_text(header + "".join(rows))
    return dst


@pytest.mark.parametrize("torchvision_layout", [False, True])
def test_gtsrb_small_layouts_and_size(gtsrb_root, tmp_path, torchvision_layout):
    root = _mini_gtsrb(gtsrb_root, tmp_path / "data", torchvision_layout)
    s = GTSRB(root=str(root), size=16, order_seed=None).load(cache_dir=tmp_path / "cache")
    assert s.train.images.shape == (6, 3, 16, 16) and s.test.images.shape == (4, 3, 16, 16)
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and s.test.labels.tolist() == [0, 1, 0, 1]
    shuffled = GTSRB(root=str(root), size=16).load(cache_dir=tmp_path / "cache")  # class-ordered: shuffled
    assert torch.equal(shuffled.train.labels, s.train.labels[shuffled.train_order])
    assert torch.equal(shuffled.train.images, s.train.images[shuffled.train_order])


def test_gtsrb_download_path_uses_torchvision(gtsrb_root, tmp_path, monkeypatch):
    import torchvision.datasets

    splits = []

    class FakeGTSRB:
        def __init__(self, root, split="train", download=False):
            splits.append((split, download))
            if not (Path(root) / "gtsrb").exists():
                _mini_gtsrb(gtsrb_root, Path(root), torchvision_layout=True)

    monkeypatch.setattr(torchvision.datasets, "GTSRB", FakeGTSRB)
    s = GTSRB(root=str(tmp_path / "new"), download=True).load(cache_dir=tmp_path / "cache")
    assert splits == [("train", True), ("test", True)] and len(s.train) == 6


def test_gtsrb_bad_inputs(gtsrb_root, tmp_path):
    with pytest.raises(DataError, match=r"gtsrb root '.*nowhere' does not exist; pass download: true"):
        GTSRB(root=str(tmp_path / "nowhere")).load(cache_dir=tmp_path / "cache")
    (tmp_path / "odd").mkdir()
    with pytest.raises(DataError, match="not a recognised layout: expected the official GTSRB/Final_Training"):
        GTSRB(root=str(tmp_path / "odd")).load(cache_dir=tmp_path / "cache")
    root = _mini_gtsrb(gtsrb_root, tmp_path / "bad", bad_label=50)
    with pytest.raises(DataError, match="gtsrb test split: label 50 is out of range for 43 classes"):
        GTSRB(root=str(root)).load(cache_dir=tmp_path / "cache")
    (root / "GTSRB" / "Final_Test" / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="test labels GT-final_test.csv were not found"):
        GTSRB(root=str(root)).load(cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- imagefolder


def test_imagenette_224(imagenette_root):
    s = ImageFolder(root=str(imagenette_root), size=224, order_seed=None).load(cache_dir=TEST_CACHE)
    assert s.train.images.shape == (800, 3, 224, 224) and s.test.images.shape == (200, 3, 224, 224)
    assert s.num_classes == 10 and s.class_names == sorted(os.listdir(imagenette_root / "train"))
    assert torch.bincount(s.train.labels).tolist() == [80] * 10
    assert torch.bincount(s.test.labels).tolist() == [20] * 10
    # the grayscale files became 3 equal channels, at the same index as in the sorted file list
    paths, _, _ = imageio.scan_class_folders(imagenette_root / "train")
    gray = [i for i, p in enumerate(paths) if Image.open(p).mode == "L"]
    assert gray, "imagenette-mini is documented to hold grayscale images"
    for i in gray:
        img = s.train.images[i]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    ref = np.asarray(Image.open(paths[0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(s.train.images[0].numpy(), ref)  # 224 -> 224: untouched pixels


def test_imagenette_64(imagenette_root, tmp_path):
    s = ImageFolder(root=str(imagenette_root), size=64, num_classes=10).load(cache_dir=tmp_path)
    assert s.train.images.shape == (800, 3, 64, 64) and s.test.images.shape == (200, 3, 64, 64)
    with pytest.raises(DataError, match="has 10 class folders but num_classes is 12"):
        ImageFolder(root=str(imagenette_root), size=64, num_classes=12).load(cache_dir=tmp_path)


def test_imagefolder_modes_crop_and_extensions(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 5:35] = 200  # the centre 20x20 square (and the filter's reach around it) is 200
    Image.fromarray(wide).save(root / "train" / "a" / "wide.PNG")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(root / "train" / "a" / "cmyk.JPG")
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(root / "train" / "b" / "rgba.png")
    Image.new("L", (8, 8), 77).save(root / "train" / "b" / "gray.bmp")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "test" / "b" / "x.ppm")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "test" / "a" / "y.jpeg")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(root / "test" / "a" / "z.webp", lossless=True)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / "val").mkdir()  # test/ wins over val/
    s = ImageFolder(root=str(root), size=10, order_seed=None).load(cache_dir=tmp_path / "cache")
    assert s.train.images.shape == (4, 3, 10, 10) and s.train.labels.tolist() == [0, 0, 1, 1]
    assert s.test.labels.tolist() == [0, 0, 1]
    assert s.test.images[1, :, 0, 0].tolist() == [4, 5, 6]
    by_name = dict(zip(["cmyk", "wide", "gray", "rgba"], s.train.images))
    assert torch.all(by_name["wide"] == 200)  # centre crop of the wide image
    assert torch.all(by_name["gray"] == 77)
    assert by_name["rgba"][:, 0, 0].tolist() == [10, 20, 30]


def _small_imagefolder(imagenette_root: Path, dst: Path) -> Path:
    return _copy_tree(imagenette_root, dst, {"train": "train", "val": "val"}, classes=2, per_class=2)


def test_imagefolder_cache_lifecycle(imagenette_root, tmp_path, monkeypatch):
    root = _small_imagefolder(imagenette_root, tmp_path / "d")
    cdir = tmp_path / "cache"
    first = ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    files = sorted((cdir / "datasets").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # and no temp file left behind
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["train_images"].shape == (4, 3, 32, 32)

    with monkeypatch.context() as m:  # second load: from the cache only
        _no_decoding(m)
        again = ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
        assert torch.equal(again.train.images, first.train.images)
        assert again.source == root.resolve()
        monkeypatch.setenv("ABL_CACHE_DIR", str(cdir))  # the env variable picks the same cache
        ImageFolder(root=str(root), size=32).load()

    files[0].write_bytes(files[0].read_bytes()[:1000])  # a truncated cache file is rebuilt
    with pytest.warns(UserWarning, match="ignoring unreadable dataset cache"):
        rebuilt = ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    assert torch.equal(rebuilt.train.images, first.train.images)

    extra = next((root / "train").iterdir())
    shutil.copy(next(extra.iterdir()), extra / "copy.JPEG")  # the source changed: decode again
    grown = ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    assert len(grown.train) == 5
    assert len(list((cdir / "datasets").iterdir())) == 1  # the stale file was replaced


def test_imagefolder_bad_inputs(imagenette_root, tmp_path):
    cdir = tmp_path / "cache"
    with pytest.raises(DataError, match=r"imagefolder root '.*nowhere' does not exist; point root at .*train/<class>"):
        ImageFolder(root=str(tmp_path / "nowhere")).load(cache_dir=cdir)
    (tmp_path / "only-train" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="has no val/ or test/ folder; expected train/<class>/<image>"):
        ImageFolder(root=str(tmp_path / "only-train")).load(cache_dir=cdir)

    root = _small_imagefolder(imagenette_root, tmp_path / "d")
    bad = root / "train" / sorted(os.listdir(root / "train"))[0] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 garbage, not a JPEG")
    with pytest.raises(DataError, match=f"cannot read image '{bad}'"):
        ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    good = next(p for p in sorted(bad.parent.iterdir()) if p.name != "broken.jpg")
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # a truncated JPEG
    with pytest.raises(DataError, match=f"cannot read image '{bad}'.*truncated"):
        ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    bad.unlink()

    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*train/empty' has no images"):
        ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    (root / "train" / "empty").rmdir()

    (root / "val" / "zebra").mkdir()
    shutil.copy(good, root / "val" / "zebra" / "z.jpg")
    with pytest.raises(DataError, match=r"class folder '.*val/zebra' is not among the train classes"):
        ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    with pytest.raises(DataError, match=r"'.*/val' holds no class folders"):
        ImageFolder(root=str(root), size=32).load(cache_dir=cdir)
    with pytest.raises(DataError, match="imagefolder needs a data root"):
        ImageFolder().load(cache_dir=cdir)


def test_errors_are_one_line(tmp_path):
    for ds in (CIFAR10(root=str(tmp_path / "x")), GTSRB(root=str(tmp_path / "x")), ImageFolder(root=str(tmp_path / "x"))):
        with pytest.raises(DataError) as e:
            ds.load(cache_dir=tmp_path)
        assert "\n" not in str(e.value)


def test_cache_files_fingerprint_and_dir(tmp_path, monkeypatch):
    f = tmp_path / "a"
    f.write_bytes(b"123")
    digest = cache.content_digest(f)[1]
    assert cache.files_fingerprint([f, tmp_path / "missing"]) == [["a", 3, digest], ["missing", None, None]]
    f.write_bytes(b"124")  # same size, new contents: a new fingerprint
    assert cache.files_fingerprint([f])[0][2] != digest
    monkeypatch.setenv("ABL_CACHE_DIR", str(tmp_path / "env"))
    assert cache.resolve_cache_dir() == tmp_path / "env" and cache.resolve_cache_dir(tmp_path) == tmp_path
    monkeypatch.delenv("ABL_CACHE_DIR")
    assert cache.resolve_cache_dir() == Path.home() / ".cache" / "abl"


def test_unwritable_cache_only_warns(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("a", "b"):  # two classes: one alone is refused
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (9, 9, 9)).save(root / split / c / "x.png")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write dataset cache"):
        s = ImageFolder(root=str(root), size=8).load(cache_dir=blocker)
    assert len(s.train) == 2 and s.num_classes == 2

"""The registered datasets: ``digits``, ``cifar10``, ``gtsrb`` and ``imagefolder``.

Each is a dataclass of its parameters with ``load(cache_dir=None) -> DatasetSplits``:
CPU uint8 images ``(N, 3, H, W)`` and int64 labels, checked. Image datasets decode
once and then read a cache file (see :mod:`abl.data.cache`; ``cache_dir`` defaults to
env ``ABL_CACHE_DIR``, else ``~/.cache/abl``). ``digits`` is built in memory from
scikit-learn in milliseconds and is not cached.

Folder layouts list files class by class, so their training split is shuffled once at
load with ``order_seed`` (after the cache, which keeps file order): a loader that does
not shuffle (the ABL authors' preset) then still sees mixed classes. ``order_seed: null``
keeps the source order; :attr:`DatasetSplits.train_order` records the permutation.

Every problem with the data raises :class:`~abl.errors.DataError` with a one-line
message; invalid parameter values raise :class:`~abl.errors.ConfigError` from
``validate()`` when the dataset is created through the registry.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from abl.config import check
from abl.data import cache, imageio
from abl.data.safepickle import UnsafePickleError, load_restricted
from abl.data.registry import DATASETS
from abl.data.types import DatasetSplits, ImageSplit
from abl.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_BATCH_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
CIFAR_FILES = CIFAR_BATCH_FILES + ["batches.meta"]
CIFAR_LAYOUTS = "torchvision's cifar-10-batches-py folder, or train/<class>/ and test/<class>/ image folders"

GTSRB_CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for trucks", "right-of-way at next intersection", "priority road", "yield", "stop",
    "no vehicles", "trucks prohibited", "no entry", "general caution", "dangerous curve left",
    "dangerous curve right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice/snow", "wild animals crossing", "end of all limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left", "keep right",
    "keep left", "roundabout mandatory", "end of no passing", "end of no passing for trucks",
]  # fmt: skip
GTSRB_LAYOUTS = (
    "the official GTSRB/Final_Training/Images/000NN/ and GTSRB/Final_Test/Images/ folders with "
    "GT-final_test.csv, or torchvision's gtsrb/GTSRB/Training/ layout"
)


def _root_path(root: str | None, what: str, how: str) -> Path:
    if root is None or not str(root).strip():
        raise DataError(f"{what} needs a data root: set dataset.root in the config (or --set dataset.root=PATH) to {how}")
    return Path(root).expanduser().resolve()


def _missing_root(what: str, root: Path, how: str) -> DataError:
    problem = "is a file, not a folder" if root.exists() else "does not exist"
    return DataError(f"{what} root '{root}' {problem}; {how}")


def _check_size(size: int) -> None:
    check(size > 0, "dataset.size", f"must be a positive number of pixels, got {size}")


def _split(images: np.ndarray | torch.Tensor, labels: list[int] | np.ndarray) -> ImageSplit:
    return ImageSplit(torch.as_tensor(images), torch.as_tensor(np.asarray(labels, dtype=np.int64)))


def _finish(splits: DatasetSplits, source: Path | None) -> DatasetSplits:
    splits.source = source
    splits.check()
    return splits


def _check_order_seed(order_seed: int | None) -> None:
    ok = order_seed is None or (isinstance(order_seed, int) and not isinstance(order_seed, bool) and order_seed >= 0)
    check(ok, "dataset.order_seed", f"must be an integer >= 0, or null to keep the file order; got {order_seed!r}")


def shuffle_train(splits: DatasetSplits, order_seed: int | None) -> DatasetSplits:
    """The training split (with its file names) in a fixed random order, ``train_order``
    recording it; ``order_seed=None`` returns ``splits`` unchanged (source order).

    Applied after the cache so one cache file serves every seed. The permutation comes
    from a CPU generator, so it is the same on every machine for a given seed.
    """
    if order_seed is None:
        return splits
    perm = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(order_seed))
    return splits.reordered(perm)


# --------------------------------------------------------------------------- digits


@DATASETS.register("digits")
@dataclass
class Digits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no files needed.

    Pixel values 0-16 become 0-255, images are upscaled to ``size`` with nearest
    neighbour and replicated to 3 channels; a stratified train/test split with
    ``test_fraction`` and ``seed`` is deterministic. scikit-learn's order already mixes
    the classes, so ``order_seed`` defaults to ``None`` (keep it) here.
    """

    size: int = 16
    test_fraction: float = 0.25
    seed: int = 0
    order_seed: int | None = None

    def augmentation(self, size: int) -> None:
        """None: no augmentation keeps these glyphs' classes well enough to help. Each is
        an 8x8 scan blown up, so a 2-pixel shift at 16 pixels moves it by a whole source
        pixel, and a mirror makes no digit. Measured (``abl demo``, ABL recovery, the
        default's isolation): crop 4 + flip + Cutout 9 89.1% CA, crop 2 + Cutout 4 96.2%,
        crop 2 alone 95.3%, none 98.2% (no defense 99.1%; benchmarks/README.md)."""
        return None

    def validate(self) -> None:
        _check_size(self.size)
        check(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        check(self.seed >= 0, "dataset.seed", f"must be >= 0, got {self.seed}")
        _check_order_seed(self.order_seed)

    def load(self, cache_dir: Path | None = None) -> DatasetSplits:
        """Build the splits in memory (``cache_dir`` is accepted and unused)."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.validate()
        data = load_digits()
        x = np.rint(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
        idx = (np.arange(self.size) * x.shape[1]) // self.size  # nearest neighbour, any size
        x = x[:, idx][:, :, idx]
        x = np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))  # (N, 3, size, size)
        y = data.target.astype(np.int64)
        try:
            tr, te = train_test_split(
                np.arange(len(y)), test_size=self.test_fraction, random_state=self.seed, stratify=y
            )
        except ValueError as exc:
            check(False, "dataset.test_fraction", f"= {self.test_fraction} cannot split 1,797 digits: {exc}")
        tr, te = np.sort(tr), np.sort(te)
        splits = DatasetSplits(
            "digits", _split(x[tr], y[tr]), _split(x[te], y[te]), 10, [str(i) for i in range(10)]
        )
        return shuffle_train(_finish(splits, None), self.order_seed)


# --------------------------------------------------------------------------- cifar10


def _entry(obj: Any, path: Path) -> dict[str, Any]:
    """A batch dict with ``str`` keys (Python 3 copies may have written bytes keys)."""
    if not isinstance(obj, dict):
        raise DataError(f"cifar10 batch file '{path}' holds a {type(obj).__name__}, not a dict as CIFAR-10's batches do")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``data_batch_N`` / ``test_batch``: (images N x 3 x 32 x 32 uint8, labels int64)."""
    entry = _entry(_load_pickle(path), path)
    if "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
        raise DataError(f"cifar10 batch file '{path}' lacks the 'data' or 'labels' entry of CIFAR-10's batches")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(
            f"cifar10 batch file '{path}': 'data' is {dtype} of shape {shape}, expected uint8 rows of 3,072 "
            "values (3 x 32 x 32) as in CIFAR-10's batches"
        )
    raw_labels = entry.get("labels", entry.get("fine_labels"))
    try:
        labels = np.asarray(raw_labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"cifar10 batch file '{path}': 'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"cifar10 batch file '{path}' has {len(data)} images but {labels.size} labels")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def _load_pickle(path: Path) -> Any:
    try:
        return load_restricted(path)
    except UnsafePickleError as exc:
        raise DataError(
            f"cifar10 batch file '{path}' is not a plain CIFAR-10 batch: {exc}; it may be built to run code. "
            "Use the official cifar-10-python.tar.gz (download: true) or an image-folder copy"
        ) from None
    except Exception as exc:  # truncated or not a pickle at all
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"cifar10 batch file '{path}' is not readable as CIFAR-10's batch format ({text}); "
            "fetch it again with download: true"
        ) from None


def read_cifar_batches(folder: Path) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """Read a ``cifar-10-batches-py`` folder: ``(train, test, class_names)``.

    The batch files are pickles; they are read with a restricted unpickler
    (:mod:`abl.data.safepickle`) that admits numpy arrays, lists and strings only, so a
    planted file cannot run code. Shapes, dtypes and label counts are checked here, the
    label range by :meth:`DatasetSplits.check`.
    """
    missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"cifar10 folder '{folder}' lacks {', '.join(missing)} (torchvision's cifar-10-batches-py needs "
            f"{', '.join(CIFAR_FILES)}); fetch it again with download: true"
        )
    meta = _entry(_load_pickle(folder / "batches.meta"), folder / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"cifar10 file '{folder / 'batches.meta'}' lacks the 10 'label_names' of CIFAR-10")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    parts = [_read_batch(folder / f) for f in CIFAR_BATCH_FILES]
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    return _split(train_x, train_y), _split(*parts[-1]), classes


def _find_cifar_batches(root: Path) -> Path | None:
    if (root / "cifar-10-batches-py").is_dir():
        return root / "cifar-10-batches-py"
    if any((root / f).is_file() for f in CIFAR_FILES):
        return root  # root is the batches folder itself (perhaps renamed)
    return None


@DATASETS.register("cifar10")
@dataclass
class CIFAR10:
    """CIFAR-10 (10 classes, 32x32) from torchvision's ``cifar-10-batches-py`` or image folders.

    ``root`` is torchvision's ``cifar-10-batches-py`` folder or the folder holding it,
    or a folder with ``train/<class>/*`` and ``test/<class>/*`` images (class folders
    sorted alphabetically give the labels; CIFAR-10's names sort into its label order;
    an image that is not 32x32 is resized to it).
    With ``download: true`` and neither layout present, torchvision downloads it into
    ``root`` (or ``<cache dir>/datasets/cifar10-download`` when ``root`` is not set).
    The training split is shuffled with ``order_seed`` in both layouts (``null``: file or
    batch order).
    """

    root: str | None = None
    download: bool = False
    order_seed: int | None = 0

    #: every layout gives 32x32 images; known before loading, so a run can check its model first
    size: ClassVar[int] = 32
    #: a mirrored airplane, car or frog is still one (:func:`abl.data.loader.data_augment`)
    mirror: ClassVar[bool] = True

    def validate(self) -> None:
        _check_order_seed(self.order_seed)

    def _how(self) -> str:
        return f"set dataset.root to a local copy of CIFAR-10 ({CIFAR_LAYOUTS}), or dataset.download: true to fetch it"

    def _locate(self, cache_dir: Path | None) -> tuple[str, Path]:
        if self.root is None and self.download:
            root = cache.resolve_cache_dir(cache_dir) / "datasets" / "cifar10-download"
        else:
            root = _root_path(self.root, "cifar10", f"CIFAR-10 ({CIFAR_LAYOUTS}), or pass download: true")
        if root.is_dir():
            batches = _find_cifar_batches(root)
            if batches is not None:
                return "torchvision", batches
            if (root / "train").is_dir() and (root / "test").is_dir():
                return "imagefolder", root
        elif not self.download:
            raise _missing_root("cifar10", root, self._how())
        if not self.download:
            raise DataError(f"cifar10 root '{root}' holds neither layout: expected {CIFAR_LAYOUTS}; {self._how()}")
        _download_cifar10(root)
        return "torchvision", root / "cifar-10-batches-py"

    def load(self, cache_dir: Path | None = None) -> DatasetSplits:
        self.validate()
        layout, root = self._locate(cache_dir)
        if layout == "torchvision":
            fingerprint = cache.files_fingerprint(root / f for f in CIFAR_FILES)
        else:
            fingerprint = [cache.tree_fingerprint(root / "train"), cache.tree_fingerprint(root / "test")]
        identity = {"layout": layout, "root": str(root)}
        splits = cache.load_cached("cifar10", identity, fingerprint, lambda: self._build(layout, root), cache_dir)
        splits.source, splits.fingerprint = root, fingerprint
        return shuffle_train(splits, self.order_seed)

    def _build(self, layout: str, root: Path) -> DatasetSplits:
        if layout == "torchvision":
            train, test, classes = read_cifar_batches(root)
        else:
            paths, labels, classes = imageio.scan_class_folders(root / "train", what="cifar10")
            if len(classes) != 10:
                raise DataError(
                    f"cifar10: '{root / 'train'}' has {len(classes)} class folders, CIFAR-10 has 10 "
                    f"({', '.join(CIFAR10_CLASSES)})"
                )
            test_paths, test_labels, _ = imageio.scan_class_folders(root / "test", classes, what="cifar10")
            train = _split(imageio.decode_images(paths, 32), labels)
            test = _split(imageio.decode_images(test_paths, 32), test_labels)
        return _finish(DatasetSplits("cifar10", train, test, 10, classes), root)


def _download_cifar10(root: Path) -> None:
    import torchvision.datasets

    try:
        with _undo_failed_download(root):
            root.mkdir(parents=True, exist_ok=True)
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)  # fetches both splits
    except Exception as exc:  # no network, disk full, bad checksum
        raise DataError(
            f"downloading CIFAR-10 into '{root}' failed ({_first_line(exc)}); offline, set dataset.root to a local "
            f"copy ({CIFAR_LAYOUTS}) and dataset.download: false, or download "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand and unpack it there"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def _undo_failed_download(root: Path) -> Iterator[None]:
    """If the body raises, remove what it created: ``root`` and the folders above it that did
    not exist, or else the new entries of an existing ``root``. An empty folder or a partial
    archive left behind would otherwise be taken for the dataset by the next run."""
    top = None
    probe = root
    while not probe.exists() and probe != probe.parent:
        top, probe = probe, probe.parent
    before = set(os.listdir(root)) if top is None and root.is_dir() else None
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        elif before is not None:
            for name in set(os.listdir(root)) - before:
                new = root / name
                if new.is_dir() and not new.is_symlink():
                    shutil.rmtree(new, ignore_errors=True)
                else:
                    new.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- gtsrb


@dataclass
class _GtsrbLayout:
    base: Path  # the GTSRB folder
    train_dir: Path  # holds 000NN/ class folders
    test_dir: Path  # holds the test .ppm files
    test_csv: Path | None


def _find_gtsrb(root: Path) -> _GtsrbLayout | None:
    for base in (root, root / "GTSRB", root / "gtsrb" / "GTSRB"):
        for train in (base / "Final_Training" / "Images", base / "Training"):
            if train.is_dir():
                test = base / "Final_Test" / "Images"
                csvs = [
                    base / "Final_Test" / "GT-final_test.csv",
                    base / "GT-final_test.csv",
                    test / "GT-final_test.csv",
                    base.parent / "GT-final_test.csv",
                ]
                test_csv = next((c for c in csvs if c.is_file()), None)
                return _GtsrbLayout(base, train, test, test_csv)
    return None


def _read_gt_csv(path: Path, folder: Path) -> tuple[list[Path], list[int]]:
    """Rows of a GTSRB ``GT-*.csv`` (``;``-separated, ``Filename`` and ``ClassId`` columns)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read GTSRB label file '{path}': {exc}") from None
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise DataError(f"GTSRB label file '{path}' needs ';'-separated columns Filename and ClassId")
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            labels.append(int(row["ClassId"]))
        except (TypeError, ValueError):
            raise DataError(f"GTSRB label file '{path}' line {line}: ClassId {row['ClassId']!r} is not an integer") from None
        paths.append(folder / str(row["Filename"]).strip())
    return paths, labels


@DATASETS.register("gtsrb")
@dataclass
class GTSRB:
    """GTSRB (43 traffic-sign classes) from the official layout or torchvision's, resized to ``size``.

    ``root`` is the folder holding ``GTSRB/`` (or ``gtsrb/GTSRB/`` as torchvision
    downloads it) or the ``GTSRB`` folder itself. Train labels come from each class
    folder's ``GT-000NN.csv`` (the folder name when there is none), test labels from
    ``GT-final_test.csv``. Every image is resized to ``size x size`` (bilinear,
    antialiased), without cropping to the ROI boxes. The training split (read class by
    class) is shuffled with ``order_seed`` (``null``: file order).
    """

    root: str | None = None
    download: bool = False
    size: int = 32
    order_seed: int | None = 0

    #: mirrored, "turn left ahead" reads as "turn right ahead" and "keep left" as "keep
    #: right" (:func:`abl.data.loader.data_augment`)
    mirror: ClassVar[bool] = False

    def validate(self) -> None:
        _check_size(self.size)
        _check_order_seed(self.order_seed)

    def _how(self) -> str:
        return f"pass download: true or point root at GTSRB ({GTSRB_LAYOUTS})"

    def _locate(self) -> _GtsrbLayout:
        root = _root_path(self.root, "gtsrb", f"GTSRB ({GTSRB_LAYOUTS}), or pass download: true")
        if not root.is_dir() and not self.download:
            raise _missing_root("gtsrb", root, self._how())
        layout = _find_gtsrb(root) if root.is_dir() else None
        if layout is None and self.download:
            _download_gtsrb(root)
            layout = _find_gtsrb(root)
        if layout is None:
            raise DataError(f"gtsrb root '{root}' is not a recognised layout: expected {GTSRB_LAYOUTS}; {self._how()}")
        if not layout.test_dir.is_dir():
            raise DataError(f"gtsrb: test images folder '{layout.test_dir}' is missing; {self._how()}")
        if layout.test_csv is None:
            raise DataError(
                f"gtsrb: the test labels GT-final_test.csv were not found in '{layout.base / 'Final_Test'}' "
                "or beside it (the official GTSRB_Final_Test_GT.zip holds them)"
            )
        return layout

    def load(self, cache_dir: Path | None = None) -> DatasetSplits:
        self.validate()
        layout = self._locate()
        fingerprint = [
            cache.tree_fingerprint(layout.train_dir),
            cache.tree_fingerprint(layout.test_dir),
            cache.files_fingerprint([layout.test_csv]),
        ]
        identity = {"root": str(layout.base), "train": str(layout.train_dir), "size": self.size}
        splits = cache.load_cached("gtsrb", identity, fingerprint, lambda: self._build(layout), cache_dir)
        splits.source, splits.fingerprint = layout.base, fingerprint
        return shuffle_train(splits, self.order_seed)

    def _build(self, layout: _GtsrbLayout) -> DatasetSplits:
        paths: list[Path] = []
        labels: list[int] = []
        class_dirs = imageio.list_class_dirs(layout.train_dir)
        if not class_dirs:
            raise DataError(f"gtsrb: '{layout.train_dir}' holds no class folders 000NN/")
        for name in class_dirs:
            folder = layout.train_dir / name
            gt = folder / f"GT-{name}.csv"
            if gt.is_file():
                p, y = _read_gt_csv(gt, folder)
            else:
                if not name.isdigit():
                    raise DataError(f"gtsrb: class folder '{folder}' has no GT-{name}.csv and its name is not a class number")
                p = imageio.list_images(folder)
                y = [int(name)] * len(p)
            if not p:
                raise DataError(f"gtsrb: class folder '{folder}' has no images")
            paths += p
            labels += y
        test_paths, test_labels = _read_gt_csv(layout.test_csv, layout.test_dir)  # type: ignore[arg-type]
        for p in (paths, test_paths):
            missing = next((f for f in p if not f.is_file()), None)
            if missing is not None:
                raise DataError(f"gtsrb: image '{missing}' listed in the GT csv file does not exist")
        train = _split(imageio.decode_images(paths, self.size), labels)
        test = _split(imageio.decode_images(test_paths, self.size), test_labels)
        return _finish(DatasetSplits("gtsrb", train, test, 43, list(GTSRB_CLASSES)), layout.base)


def _download_gtsrb(root: Path) -> None:
    import torchvision.datasets

    try:
        with _undo_failed_download(root):
            root.mkdir(parents=True, exist_ok=True)
            for split in ("train", "test"):
                torchvision.datasets.GTSRB(str(root), split=split, download=True)
    except Exception as exc:  # no network, disk full, bad checksum
        raise DataError(
            f"downloading GTSRB into '{root}' failed ({_first_line(exc)}); offline, set dataset.root to a local "
            "copy and dataset.download: false, or fetch GTSRB-Training_fixed.zip, "
            "GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip from https://benchmark.ini.rub.de/ "
            "and unpack them there"
        ) from None


# --------------------------------------------------------------------------- imagefolder


@DATASETS.register("imagefolder")
@dataclass
class ImageFolder:
    """Any ``root/train/<class>/*`` plus ``root/test/<class>/*`` (or ``root/val/<class>/*``).

    Classes are the sorted train folder names. When both ``test/`` and ``val/`` exist,
    ``test/`` is the test split. Each image's shorter side is resized to ``size`` and
    the centre square kept (bilinear, antialiased); grayscale, CMYK and RGBA images
    become RGB. Extensions: jpg, jpeg, png, ppm, bmp, webp (any case).
    ``num_classes``, when set, must match the number of train class folders. The training
    split (read class by class) is shuffled with ``order_seed`` (``null``: file order);
    ``train_files`` follows it. ``mirror``: a left-right mirrored image keeps its class
    (photos of objects: true; text, digits, signs with a direction: set false); the
    default ABL's recovery augments with flips only where it does
    (:func:`abl.data.loader.data_augment`).
    """

    root: str | None = None
    size: int = 224
    num_classes: int | None = None
    order_seed: int | None = 0
    mirror: bool = True

    def validate(self) -> None:
        _check_size(self.size)
        _check_order_seed(self.order_seed)
        if self.num_classes is not None:
            check(self.num_classes >= 2, "dataset.num_classes", f"must be at least 2, got {self.num_classes}")

    def _locate(self) -> tuple[Path, Path]:
        layout = "train/<class>/<image> and val/<class>/<image> (or test/<class>/<image>) folders"
        root = _root_path(self.root, "imagefolder", f"a folder with {layout}")
        if not root.is_dir():
            raise _missing_root("imagefolder", root, f"point root at a folder with {layout}")
        test = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if not (root / "train").is_dir() or test is None:
            lacking = "train/" if not (root / "train").is_dir() else "val/ or test/"
            raise DataError(f"imagefolder root '{root}' has no {lacking} folder; expected {layout}")
        return root, test

    def load(self, cache_dir: Path | None = None) -> DatasetSplits:
        self.validate()
        root, test = self._locate()
        fingerprint = [cache.tree_fingerprint(root / "train"), cache.tree_fingerprint(test)]
        identity = {"root": str(root), "test": test.name, "size": self.size, "crop": "center", "files": True}
        splits = cache.load_cached("imagefolder", identity, fingerprint, lambda: self._build(root, test), cache_dir)
        if self.num_classes is not None and splits.num_classes != self.num_classes:
            raise DataError(
                f"imagefolder: '{root / 'train'}' has {splits.num_classes} class folders but num_classes is "
                f"{self.num_classes}"
            )
        splits.source, splits.fingerprint = root, fingerprint
        return shuffle_train(splits, self.order_seed)

    def _build(self, root: Path, test: Path) -> DatasetSplits:
        paths, labels, classes = imageio.scan_class_folders(root / "train", what="imagefolder")
        test_paths, test_labels, _ = imageio.scan_class_folders(test, classes, what="imagefolder")
        train = _split(imageio.decode_images(paths, self.size, crop=True), labels)
        test_split = _split(imageio.decode_images(test_paths, self.size, crop=True), test_labels)
        files = [str(Path(p).relative_to(root)) for p in paths]
        return _finish(DatasetSplits("imagefolder", train, test_split, len(classes), classes, train_files=files), root)


__all__ = ["CIFAR10", "GTSRB", "Digits", "ImageFolder", "read_cifar_batches", "shuffle_train"]

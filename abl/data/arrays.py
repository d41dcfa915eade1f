"""The ``arrays`` dataset: train and test images as numpy arrays in one ``.npz`` file.

Poisoning toolkits and benchmark suites hand poisoned sets around as arrays; this reads
them without pickle (``np.load(allow_pickle=False)``: an object array is refused with a
one-line error instead of being unpickled) and validates them like the folder datasets.

Keys: ``x_train``, ``y_train``, ``x_test``, ``y_test``; optional ``class_names`` (a 1-D
string array). Images are either uint8 ``(N, H, W, 3)`` (channels last, as image files
decode) or float ``(N, 3, H, W)`` in [0, 1] (channels first, as PyTorch models take
them); float images are stored as uint8 (``round(255 x)``) like every other dataset.
Labels are integers ``0..C-1``, ``C`` being ``len(class_names)`` or else the largest label
plus one. Write one with::

    np.savez("poisoned.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             class_names=np.array(["cat", "dog"]))
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abl.data import cache
from abl.data.datasets import _check_order_seed, _finish, _split, shuffle_train
from abl.data.registry import DATASETS
from abl.data.types import DatasetSplits
from abl.errors import DataError

KEYS = ("x_train", "y_train", "x_test", "y_test")
LAYOUTS = "uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]"
_FLOAT_TOLERANCE = 1e-6  # float32 rounding of values computed as 0..1


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The file's arrays by name; any unreadable file or object array raises DataError."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"arrays file '{path}' holds a single array, not a .npz; save one with np.savez(path, "
                            f"{'=..., '.join(KEYS)}=...)")
        with npz:
            out = {}
            for key in npz.files:
                try:
                    out[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc):
                        raise DataError(
                            f"arrays file '{path}': '{key}' is an object array, which would need pickle to read; "
                            "save numeric images and labels (and class_names as a string array, np.array([...]))"
                        ) from None
                    raise
            return out
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"arrays file '{path}' does not exist; set dataset.path to your .npz file") from None
    except IsADirectoryError:
        raise DataError(f"arrays path '{path}' is a folder; set dataset.path to a .npz file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"arrays file '{path}' is not a readable .npz ({text}); save it with np.savez") from None


def _images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """``x`` as uint8 ``(N, 3, H, W)``, checked."""
    where = f"arrays file '{path}': '{key}'"
    if x.ndim != 4:
        raise DataError(f"{where} has shape {x.shape}; expected 4 dimensions: {LAYOUTS}")
    if x.dtype == np.uint8:
        if x.shape[3] != 3:
            raise DataError(f"{where} is uint8 of shape {x.shape}; uint8 images must be (N, H, W, 3) (channels last)")
        x = x.transpose(0, 3, 1, 2)
    elif np.issubdtype(x.dtype, np.floating):
        if x.shape[1] != 3:
            raise DataError(f"{where} is {x.dtype} of shape {x.shape}; float images must be (N, 3, H, W) (channels first)")
        if x.size and not np.isfinite(x).all():
            raise DataError(f"{where} holds NaN or infinite values; images must be in [0, 1]")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
            hint = " (divide by 255)" if hi > 1.5 else ""
            raise DataError(f"{where} has values in [{lo:g}, {hi:g}]; float images must be in [0, 1]{hint}")
        x = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise DataError(f"{where} has dtype {x.dtype}; expected {LAYOUTS}")
    if x.shape[0] == 0:
        raise DataError(f"{where} holds no images")
    if x.shape[2] != x.shape[3]:
        raise DataError(f"{where}: images are {x.shape[2]}x{x.shape[3]}; the models take square images, crop or pad them")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, key: str, path: Path) -> np.ndarray:
    where = f"arrays file '{path}': '{key}'"
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{where} has dtype {y.dtype}; labels must be integers 0..C-1")
    if y.ndim != 1:
        raise DataError(f"{where} has shape {y.shape}; labels must be 1-D (one integer per image, not one-hot)")
    if y.shape[0] != n:
        raise DataError(f"{where} has {y.shape[0]} labels but there are {n} images")
    return y.astype(np.int64)


def _class_names(arrays: dict[str, np.ndarray], path: Path) -> list[str] | None:
    if "class_names" not in arrays:
        return None
    names = arrays["class_names"]
    where = f"arrays file '{path}': 'class_names'"
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{where} is {names.dtype} of shape {names.shape}; save a 1-D string array, np.array([...])")
    out = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    dup = next((n for n in out if out.count(n) > 1), None)
    if dup is not None:
        raise DataError(f"{where} names class '{dup}' twice; class names must be unique")
    return out


def read_arrays(path: Path) -> DatasetSplits:
    """Read and validate an arrays ``.npz`` into checked splits (no shuffle, no cache)."""
    arrays = _read_npz(path)
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "none"
        raise DataError(f"arrays file '{path}' lacks '{missing[0]}' (it has: {have}); it needs {', '.join(KEYS)}")
    x_train = _images(arrays["x_train"], "x_train", path)
    x_test = _images(arrays["x_test"], "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"arrays file '{path}': train images are {x_train.shape[2]}x{x_train.shape[3]} but test images are "
            f"{x_test.shape[2]}x{x_test.shape[3]}; give both splits the same size"
        )
    y_train = _labels(arrays["y_train"], len(x_train), "y_train", path)
    y_test = _labels(arrays["y_test"], len(x_test), "y_test", path)
    names = _class_names(arrays, path)
    top = int(max(y_train.max(), y_test.max()))
    n_classes = len(names) if names is not None else top + 1
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            source = f"{n_classes} class_names" if names is not None else f"{n_classes} classes"
            raise DataError(f"arrays file '{path}': '{key}' holds label {bad}, out of range for {source} (0..{n_classes - 1})")
    if n_classes < 2:
        raise DataError(f"arrays file '{path}' has {n_classes} class; a classifier needs at least 2")
    names = names if names is not None else [str(i) for i in range(n_classes)]
    splits = DatasetSplits("arrays", _split(x_train, y_train), _split(x_test, y_test), n_classes, names)
    return _finish(splits, path)


def _path(path: str | None) -> Path:
    if path is None or not str(path).strip():
        raise DataError("arrays needs a file: set dataset.path in the config (or --set dataset.path=FILE.npz)")
    return Path(path).expanduser().resolve()


@DATASETS.register("arrays")
@dataclass
class Arrays:
    """Images and labels from a numpy ``.npz`` (x_train, y_train, x_test, y_test, optional class_names).

    Images are uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1]; labels integers
    ``0..C-1``. Read with ``allow_pickle=False``. Decoded once into the dataset cache (keyed
    by the file's contents), then shuffled with ``order_seed`` like the folder datasets
    (arrays are often sorted by class; ``null`` keeps the file's order).

    Parameters:
        path: the .npz file; a relative path is read against the config file's folder.
        order_seed: seed of the one-time shuffle of the training split (null: file order).
        mirror: a left-right mirrored image keeps its class (false by default: arrays are
            often digits or text); the default ABL's recovery flips images only when true
            (:func:`abl.data.loader.data_augment`).
    """

    path: str | None = None
    order_seed: int | None = 0
    mirror: bool = False

    def validate(self) -> None:
        _check_order_seed(self.order_seed)

    def load(self, cache_dir: Path | None = None) -> DatasetSplits:
        self.validate()
        path = _path(self.path)
        if not path.is_file():
            problem = "is a folder" if path.is_dir() else "does not exist"
            raise DataError(f"arrays file '{path}' {problem}; set dataset.path to your .npz file")
        fingerprint = cache.files_fingerprint([path])
        splits = cache.load_cached("arrays", {"path": str(path)}, fingerprint, lambda: read_arrays(path), cache_dir)
        # fingerprint: what the run records of its data (like the other datasets set it)
        splits.source, splits.fingerprint = path, fingerprint
        return shuffle_train(splits, self.order_seed)

    def peek(self) -> tuple[int, list[str] | None]:
        """``(image size, class names or None)`` from the file's headers, without reading the
        images (for :func:`abl.load_model`)."""
        path = _path(self.path)
        try:
            with zipfile.ZipFile(path) as zf, zf.open("x_test.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"arrays file '{path}' cannot be read for its image size ({exc})") from None
        if len(shape) != 4:
            raise DataError(f"arrays file '{path}': 'x_test' has shape {shape}; expected {LAYOUTS}")
        size = int(shape[2] if dtype == np.uint8 else shape[3])  # (N, H, W, 3) or (N, 3, H, W)
        names = _class_names(_read_npz_key(path, "class_names"), path)
        return size, names


def _read_npz_key(path: Path, key: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key]} if key in npz.files else {}
    except (OSError, ValueError) as exc:
        raise DataError(f"arrays file '{path}': cannot read '{key}' ({exc})") from None


__all__ = ["Arrays", "read_arrays"]

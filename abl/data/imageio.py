"""Image files to uint8 tensors: folder scanning and fast, threaded decoding with PIL.

Every problem with the files themselves (an empty class folder, an unreadable or
corrupt image) raises :class:`~abl.errors.DataError` naming the path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from abl.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")
"""File name endings read as images (compared case-insensitively)."""

_CHUNK = 512  # images per task handed to a decoding thread


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _utf8_name(path: str, what: str) -> None:
    """Raise DataError if ``path`` is not valid UTF-8 (Python decodes such bytes to lone
    surrogates, which fail later when the name is hashed, stored or printed)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise DataError(
            f"{what} '{shown}' has a name that is not valid UTF-8; rename it (file names are recorded with the run)"
        ) from None


def list_class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``split_dir``."""
    try:
        entries = list(os.scandir(split_dir))
    except OSError as exc:
        raise DataError(f"cannot list folder '{split_dir}': {_first_line(exc)}") from None
    names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    for name in names:
        _utf8_name(os.path.join(split_dir, name), "class folder")
    return names


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); hidden files and folders are skipped.

    Symbolic links are followed, but no folder is entered twice (a link back to a parent
    would otherwise repeat every image until the OS gives up at 40 levels), and a file
    reached by several names (links) is listed once, under the first name in sorted order.
    """
    return [path for path, _ in _list_images_keyed(folder)]


_FileKey = tuple[int, int]  # (device, inode): one file, whatever name or link reaches it


def _list_images_keyed(folder: Path) -> list[tuple[Path, _FileKey | None]]:
    """:func:`list_images` with each file's key (``None``: a dangling link)."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = None
        if key is not None and key in seen_dirs:
            dirnames[:] = []
            continue
        if key is not None:
            seen_dirs.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and is_image_file(f):
                _utf8_name(os.path.join(dirpath, f), "image file")
                found.append(Path(dirpath, f))
    unique: list[tuple[Path, _FileKey | None]] = []
    seen_files: set[_FileKey] = set()
    for path in sorted(found):
        try:
            st = os.stat(path)
        except OSError:  # a dangling link: kept, so that decoding names it
            unique.append((path, None))
            continue
        if (st.st_dev, st.st_ino) not in seen_files:
            seen_files.add((st.st_dev, st.st_ino))
            unique.append((path, (st.st_dev, st.st_ino)))
    return unique


def scan_class_folders(
    split_dir: Path, classes: Sequence[str] | None = None, what: str = "dataset"
) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an image-folder split ``split_dir/<class>/*``.

    With ``classes`` (the train split's sorted class names) every folder must be one of
    them and labels index into that list; without it the folders found define the
    classes. Returns ``(paths, labels, class_names)``.

    A file reached from two class folders (a link such as ``cat/up -> ..`` reaches every
    ``dog`` image from ``cat``) is an error naming both paths: its label would be a guess,
    and guessing trains some images under the wrong class without a word. A file reached
    twice within one class folder is simply listed once.
    """
    found = list_class_dirs(split_dir)
    if not found:
        raise DataError(
            f"{what}: '{split_dir}' holds no class folders; expected {split_dir}/<class>/<image> "
            f"files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    if classes is None:
        if len(found) < 2:
            # One class would train a model that cannot be wrong ("100% accuracy").
            raise DataError(
                f"{what}: '{split_dir}' holds one class folder ('{found[0]}'); a classifier needs at least 2: "
                f"add a folder per class, e.g. {split_dir}/<class>/<image>"
            )
        classes = found
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    owner: dict[_FileKey, tuple[str, Path]] = {}
    for name in found:
        if name not in index:
            raise DataError(
                f"{what}: class folder '{split_dir / name}' is not among the train classes; "
                "the test/val split may only use class folder names that train/ has"
            )
        keyed = _list_images_keyed(split_dir / name)
        for path, key in keyed:
            if key is None:
                continue
            if key in owner:
                first_class, first_path = owner[key]
                raise DataError(
                    f"{what}: image '{path}' in class '{name}' is the same file as '{first_path}' in class "
                    f"'{first_class}' (a link between class folders); an image may have one label: remove the link"
                )
            owner[key] = (name, path)
        files = [path for path, _ in keyed]
        if not files:
            raise DataError(
                f"{what}: class folder '{split_dir / name}' has no images "
                f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)}); remove the folder or add its images"
            )
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return paths, labels, list(classes)


_WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
"""Pillow modes of 16-bit grayscale images (PNG, PGM); their values span 0-65535."""


def _gray16_to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit ``L``, scaled by 255/65535 (rounded).

    Pillow's ``convert`` clips such values to 255 instead of scaling them, so a mid-grey
    32768 would become white.
    """
    from PIL import Image

    wide = np.asarray(im).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L


def decode_image(path: str | os.PathLike, size: int, crop: bool = False) -> np.ndarray:
    """One image file as a uint8 ``(size, size, 3)`` RGB array.

    ``crop=False`` resizes the whole image to ``size x size`` (aspect ratio not kept);
    ``crop=True`` resizes the shorter side to ``size`` and keeps the centre square.
    Resampling is bilinear with Pillow's antialiasing when shrinking. Grayscale, CMYK,
    palette and alpha images are converted to RGB (alpha is dropped).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and (im.width >= 2 * size and im.height >= 2 * size):
                im.draft("RGB", (size, size))  # DCT-domain downscale, still >= size
            if im.mode in _WIDE_GRAY_MODES:
                im = _gray16_to_8bit(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            else:
                im.load()
            w, h = im.size
            if crop and w != h:
                s = min(w, h)
                box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
                im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
            elif (w, h) != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image '{path}': {_first_line(exc)}; replace or delete the file") from None


def _workers(n_items: int) -> int:
    env = os.environ.get("ABL_DECODE_WORKERS", "")
    if env.isdigit() and int(env) > 0:
        wanted = int(env)
    else:
        try:
            wanted = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            wanted = os.cpu_count() or 1
    return max(1, min(wanted, 8, -(-n_items // _CHUNK)))


def decode_images(paths: Sequence[str | os.PathLike], size: int, crop: bool = False) -> np.ndarray:
    """Decode many image files into one uint8 ``(N, 3, size, size)`` array.

    Work is split into chunks handed to a thread pool (PIL releases the GIL while it
    decodes); set ``ABL_DECODE_WORKERS`` to choose the number of threads.
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def run(start: int) -> None:
        for i in range(start, min(start + _CHUNK, len(paths))):
            out[i] = decode_image(paths[i], size, crop).transpose(2, 0, 1)

    starts = range(0, len(paths), _CHUNK)
    workers = _workers(len(paths))
    if workers == 1:
        for s in starts:
            run(s)
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="abl-decode")
        try:
            for _ in pool.map(run, starts):  # re-raises the first DataError
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out

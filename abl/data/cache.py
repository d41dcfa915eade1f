"""An on-disk cache of decoded datasets, so that only the first load decodes images.

A cache file is an uncompressed ``.npz`` (read with ``allow_pickle=False``) named
``<dataset>-<identity hash>-<fingerprint hash>.npz`` under ``<cache dir>/datasets/``:

* the *identity* is the dataset name, the resolved root, the parameters that change
  the tensors and :data:`CACHE_FORMAT`;
* the *fingerprint* hashes the source files' relative paths, sizes and contents, so
  any edit invalidates the cache, even one that keeps a file's size and mtime (a
  stat-only key would serve such a file stale). Reading every file costs about as
  much as a warm read of the data; decoding costs far more.

Files are written to a temporary name and moved into place with :func:`os.replace`,
so a crash never leaves a half-written file under the final name. The decode and write
happen under an advisory lock on ``<file>.lock``, so runs that start together on one
machine (the cells of ``abl sweep``) decode a dataset once: the others wait and read it. A cache file that
cannot be read or fails the checks is ignored (with a warning) and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abl.data.types import DatasetSplits, ImageSplit

CACHE_FORMAT = 2
"""Bump when the decoding changes, so that old cache files are no longer used
(2: 16-bit grayscale images are scaled to 8 bits, no longer clipped to white)."""

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names", "num_classes")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else env ``ABL_CACHE_DIR``, else ``~/.cache/abl``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ABL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "abl"


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_READ_CHUNK = 1 << 20


def content_digest(path: str | os.PathLike) -> tuple[int, str]:
    """``(size, blake2b hex digest)`` of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def files_fingerprint(paths: Iterable[Path]) -> list[Any]:
    """``[name, size, content digest]`` of each file (``None`` entries for unreadable files)."""
    out: list[Any] = []
    for p in paths:
        try:
            out.append([p.name, *content_digest(p)])
        except OSError:
            out.append([p.name, None, None])
    return out


def tree_fingerprint(root: Path) -> str:
    """A hash of every file's relative path, size and contents under ``root``.

    Linked folders are followed but none is entered twice, so a link loop is hashed once
    instead of to the OS's 40-level limit. Names that are not valid UTF-8 are hashed by
    their bytes (the scan that follows refuses them with a clear error).
    """
    lines: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [("", str(root))]
    while stack:
        rel, folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                lines.append(f"{rel}\tseen")
                continue
            seen.add((st.st_dev, st.st_ino))
            # sorted, so that which of two links to one folder is hashed in full is fixed
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            lines.append(f"!{rel}")
            continue
        for e in entries:
            name = rel + e.name
            try:
                if e.is_dir():
                    lines.append(name + "/")
                    stack.append((name + "/", e.path))
                else:
                    size, digest = content_digest(e.path)
                    lines.append(f"{name}\t{size}\t{digest}")
            except OSError:
                lines.append(name + "\t?")
    lines.sort()
    digest = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{len(lines)}:{digest}"


def cache_path(cache_dir: Path, name: str, identity: Mapping[str, Any], fingerprint: Any) -> Path:
    ident = _digest({"format": CACHE_FORMAT, "name": name, **identity})
    return cache_dir / "datasets" / f"{name}-{ident}-{_digest(fingerprint)}.npz"


def read_splits(path: Path, name: str) -> DatasetSplits:
    """Read a cache file; any problem raises (the caller treats it as a cache miss)."""
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in _ARRAYS if k not in npz.files]
        if missing:
            raise ValueError(f"missing array {missing[0]}")
        arrays = {k: npz[k] for k in _ARRAYS}
        train_files = [str(f) for f in npz["train_files"].tolist()] if "train_files" in npz.files else None
    splits = DatasetSplits(
        name=name,
        train=ImageSplit(torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"])),
        test=ImageSplit(torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"])),
        num_classes=int(arrays["num_classes"]),
        class_names=[str(c) for c in arrays["class_names"].tolist()],
        train_files=train_files,
    )
    splits.check()
    return splits


def write_splits(path: Path, splits: DatasetSplits) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                train_images=splits.train.images.numpy(),
                train_labels=splits.train.labels.numpy(),
                test_images=splits.test.images.numpy(),
                test_labels=splits.test.labels.numpy(),
                class_names=np.array([str(c) for c in splits.class_names], dtype=np.str_),
                num_classes=np.array(splits.num_classes, dtype=np.int64),
                **({"train_files": np.array(splits.train_files, dtype=np.str_)} if splits.train_files else {}),
            )
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds public data
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _remove_stale(path: Path) -> None:
    """Delete older cache files of the same dataset identity (other fingerprints), and
    temporary files that a crashed writer left behind more than a day ago."""
    prefix = path.name.rsplit("-", 1)[0] + "-"
    old_files = [p for p in path.parent.glob(f"{prefix}*.npz") if p != path]
    day_ago = time.time() - 86400
    for tmp in path.parent.glob(f".{prefix}*.tmp"):
        try:
            if tmp.stat().st_mtime < day_ago:
                old_files.append(tmp)
        except OSError:
            pass
    for old in old_files:
        try:
            old.unlink()
        except OSError:
            pass


def _why_unreadable(exc: Exception) -> str:
    """Why a cache file could not be read, in words that never suggest loading it with
    ``allow_pickle`` (numpy's own message does): a cache file holding pickled objects was not
    written by abl, and unpickling it could run any code."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "pickle" in text.lower():
        return "it holds pickled Python objects, which abl never loads: not a file abl wrote"
    return text


#: a first decode slower than this gets a line saying what is happening (CIFAR-10: ~15 s)
DECODE_NOTE_AFTER_S = 2.0


def _decode_noting_delay(name: str, path: Path, build: Callable[[], DatasetSplits]) -> DatasetSplits:
    """``build()``; if it runs past :data:`DECODE_NOTE_AFTER_S`, log that the dataset is being
    decoded for the first time (and where it will be cached), then how long it took. A quick
    build (or one that fails on bad input) says nothing, so its error stays the only line."""
    import logging
    import threading

    log = logging.getLogger(__name__)
    t0 = time.perf_counter()
    said = threading.Event()

    def say() -> None:
        said.set()
        log.info("decoding %s for the first time; later runs read it from the cache in %s", name, path.parent)

    note = threading.Timer(DECODE_NOTE_AFTER_S, say)
    note.daemon = True
    note.start()
    try:
        splits = build()
    finally:
        note.cancel()
        note.join()  # a note being written finishes before anything else is printed
    if said.is_set():
        log.info("decoded %s in %.1f s", name, time.perf_counter() - t0)
    return splits


def load_cached(
    name: str,
    identity: Mapping[str, Any],
    fingerprint: Any,
    build: Callable[[], DatasetSplits],
    cache_dir: str | os.PathLike | None = None,
) -> DatasetSplits:
    """The cached splits for ``(name, identity, fingerprint)``, else ``build()`` and store them.

    ``build`` must return checked splits. Failing to write the cache (a read-only
    folder, a full disk) only warns: the loaded data is still returned.
    """
    path = cache_path(resolve_cache_dir(cache_dir), name, identity, fingerprint)
    if path.is_file():
        try:
            return read_splits(path, name)
        except Exception as exc:  # corrupt, truncated or foreign file: rebuild it
            warnings.warn(f"ignoring unreadable dataset cache '{path}' ({_why_unreadable(exc)}); rebuilding it",
                          stacklevel=3)
    with _decode_lock(path):
        if path.is_file():  # another run wrote it while this one waited for the lock
            try:
                return read_splits(path, name)
            except Exception:  # noqa: BLE001 - the file this run found unreadable: rebuild it
                pass
        splits = _decode_noting_delay(name, path, build)
        try:
            write_splits(path, splits)
            _remove_stale(path)
        except OSError as exc:
            warnings.warn(f"could not write dataset cache '{path}': {exc}", stacklevel=3)
    return splits


@contextlib.contextmanager
def _decode_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` while a dataset is decoded and written
    (dropped by the kernel if the process dies). Where it cannot be taken (no ``fcntl``,
    a read-only cache folder) it locks nothing: the decode just is not shared.

    Once the cache file is written the lock file goes: a run that opened it before still
    gets the lock and then finds the file, and later runs read the file without locking."""
    fd = None
    lock = path.with_name(path.name + ".lock")
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            if path.is_file():
                with contextlib.suppress(OSError):
                    lock.unlink()
            os.close(fd)

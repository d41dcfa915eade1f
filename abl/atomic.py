"""All-or-nothing file writes: a temp file beside the target, fsync, then ``os.replace``.

A process killed mid-write leaves the previous file (or none) under the final name, never a
torn one. Used by the results store, checkpoints and the stage cache; depends on nothing
else in ``abl``, so any module may import it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``write(f)`` through a temp file beside it and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path``, all or nothing."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))

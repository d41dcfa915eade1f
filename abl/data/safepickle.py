"""Reading CIFAR-10's pickled batch files without running code from them.

CIFAR-10's python release (``cifar-10-batches-py``) stores each batch as a pickle: a dict
of a uint8 ``numpy`` array, a list of labels and a few strings. ``pickle.load`` on such a
file runs whatever callables the file names, so a "CIFAR-10 copy" handed to a user could
run any command. :func:`load_restricted` admits only the globals a real batch needs (numpy's
array and dtype reconstructors and ``_codecs.encode``, which Python 3's protocol-2 pickles
use for bytes) and refuses every other one before calling it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

#: the only globals a CIFAR batch pickle may name: the original Python 2 files use the
#: first three; numpy 2 writes ``numpy._core``; protocol 5 rebuilds arrays with
#: ``_frombuffer``; Python 3's protocol 2 writes bytes as ``_codecs.encode(str, 'latin1')``.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a callable outside :data:`ALLOWED_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"it names '{module}.{name}', which a CIFAR-10 batch never holds (refused without running it)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:  # no external references either
        raise UnsafePickleError("it holds a persistent reference, which a CIFAR-10 batch never holds")


def load_restricted(path: Path) -> Any:
    """Unpickle ``path`` admitting only :data:`ALLOWED_GLOBALS` (latin-1 for Python 2 strings,
    as the original CIFAR-10 files need). Raises :class:`UnsafePickleError` for any other
    global and ``pickle.UnpicklingError`` / ``EOFError`` / ``ValueError`` for a corrupt file."""
    data = Path(path).read_bytes()
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()

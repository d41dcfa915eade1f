"""Where a run came from: the code revision and the software and machine it ran on,
recorded in every run's ``meta.json``. Recording provenance never fails a run."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

import abl

# The folder whose git checkout is recorded as the code revision (tests monkeypatch it).
_CODE_DIR = Path(abl.__file__).resolve().parent


def code_revision(path: Path | None = None) -> dict[str, Any] | None:
    """``{"revision": <HEAD sha>, "dirty": bool}`` of the git checkout holding ``path``.

    ``path`` defaults to the ``abl`` package folder. None when it is not a git checkout
    or git is not installed: recording provenance never fails a run. ``dirty`` counts
    changes to tracked files only.
    """
    where = str(path if path is not None else _CODE_DIR)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take the repo's index.lock

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True,
                                 timeout=10, env=env, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    if not revision:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def environment() -> dict[str, Any]:
    """Versions, code revision, platform and host name, for ``meta.json``."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version = None
    return {
        "abl_version": abl.__version__,
        "git": code_revision(),
        "torch_version": torch_version,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }

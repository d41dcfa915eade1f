"""Shared test fixtures.

Real-data fixtures unpack the archives of ``../shared/data`` (beside the repository)
once into ``<repo>/.cache/test-data/<name>/`` (git ignores ``.cache/``) and reuse them
in later runs. A missing archive fails the test loudly: the real-data tests are part
of the suite, never silently skipped.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_DATA = REPO / ".cache" / "test-data"
TEST_CACHE = REPO / ".cache" / "test-cache"


def _unpack(archive_name: str, name: str) -> Path:
    """Unpack ``../shared/data/<archive_name>`` into ``.cache/test-data/<name>`` once."""
    target = TEST_DATA / name
    if target.is_dir():
        return target
    archive = SHARED_DATA / archive_name
    if not archive.is_file():
        pytest.fail(
            f"../shared/data/{archive_name} is missing (looked at {archive}): "
            "the real-data tests need the shared data folder beside the repo"
        )
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    # Extract beside the target, then rename: an interrupted run never leaves a
    # half-unpacked folder under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=TEST_DATA))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not just a concurrent run that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """CIFAR-10 as JPEG image folders: ``train/<class>/*.jpg``, ``test/<class>/*.jpg``."""
    return _unpack("cifar10-jpeg.tar.gz", "cifar10-jpeg")


@pytest.fixture(scope="session")
def gtsrb_root() -> Path:
    """GTSRB in the official layout: the folder that contains ``GTSRB/``."""
    return _unpack("gtsrb32.tar.xz", "gtsrb32")


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """Imagenette-mini: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``."""
    return _unpack("imagenette-mini.tar.gz", "imagenette-mini")


@pytest.fixture(scope="session")
def cifar10_splits(cifar10_root: Path):
    """The full CIFAR-10 (image-folder layout) loaded once per session.

    The decoded tensors are cached in ``<repo>/.cache/test-cache`` (kept between runs).
    """
    from abl.data.datasets import CIFAR10

    return CIFAR10(root=str(cifar10_root)).load(cache_dir=TEST_CACHE)


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker trains with one torch thread: two workers at two
    threads each on two cores run many times slower than one process (oversubscription)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Attack artefacts (surrogates, triggers) go to a per-session folder, never ~/.cache."""
    old = os.environ.get("ABL_CACHE_DIR")
    os.environ["ABL_CACHE_DIR"] = str(tmp_path_factory.mktemp("abl-cache"))
    yield
    if old is None:
        os.environ.pop("ABL_CACHE_DIR", None)
    else:
        os.environ["ABL_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def digits32():
    """300 real digits at 32x32: the training split the optimisation-attack tests fit on."""
    import torch

    from abl.data import DATASETS

    train = DATASETS.create({"name": "digits", "size": 32}).load().train
    return train.subset(torch.arange(300))


@pytest.fixture
def surrogate_trainings(monkeypatch) -> list[int]:
    """Counts the clean-surrogate trainings an attack triggers (one entry per training)."""
    from abl.attacks import surrogate

    calls: list[int] = []
    real = surrogate.train_clean_model

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(surrogate, "train_clean_model", counted)
    return calls

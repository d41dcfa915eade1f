"""The ``arrays`` dataset: a numpy ``.npz`` of train and test images trains end to end,
is cached and shuffled like the folder datasets, and bad arrays get one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from abl.cli import main
from abl.data import DATASETS
from abl.data.cache import resolve_cache_dir
from abl.errors import DataError
from abl.store import RunStore


def _digits(n_train: int = 300, n_test: int = 100) -> dict[str, np.ndarray]:
    """Real scans (scikit-learn's digits) as uint8 (N, 16, 16, 3), labels 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8).repeat(2, 1).repeat(2, 2)
    x = np.ascontiguousarray(np.repeat(x[..., None], 3, axis=3))
    y = d.target.astype(np.int64)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train : n_train + n_test],
            "y_test": y[n_train : n_train + n_test]}


def _load(path, cache, **kw):
    return DATASETS.create({"name": "arrays", "path": str(path), **kw}).load(cache)


def test_npz_trains_end_to_end_with_a_relative_path(tmp_path, capsys):
    """`dataset: {name: arrays, path: FILE.npz}` in a config, the path relative to the
    config's folder, run from elsewhere: it trains and the run records the file it read."""
    torch.set_num_threads(1)
    data_dir = tmp_path / "project"
    data_dir.mkdir()
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    np.savez(data_dir / "poisoned.npz", class_names=names, **_digits())
    cfg = {
        "name": "arrays-e2e",
        "dataset": {"name": "arrays", "path": "poisoned.npz"},
        "model": {"name": "small_cnn", "width": 8},
        "attack": {"name": "badnets", "rate": 0.1, "target": 0},
        "defense": {"name": "none", "epochs": 2},
        "train": {"progress": False, "batch_size": 64, "threads": 1},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
    }
    (data_dir / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["run", str(data_dir / "cfg.yaml")])
    err = capsys.readouterr().err
    assert code == 0, err
    (rec,) = RunStore(tmp_path / "runs").list_runs()
    assert rec.status == "finished"
    assert rec.config["dataset"]["path"] == str((data_dir / "poisoned.npz").resolve())
    assert rec.array("poison_mask").shape == (300,) and rec.array("poison_mask").sum() == 30
    assert set(rec.final_metrics) >= {"clean_acc", "asr"}
    assert rec.array("train_order").shape == (300,)  # shuffled with the default order_seed 0


def test_float_nchw_equals_uint8_nhwc_and_class_names_are_kept(tmp_path):
    arrays = _digits(60, 20)
    np.savez(tmp_path / "u8.npz", class_names=np.array([f"c{i}" for i in range(10)]), **arrays)
    # 0.3 below each value: rounding, not truncation, gives the uint8 values back
    as_float = {k: (np.clip(v.transpose(0, 3, 1, 2).astype(np.float32) - 0.3, 0, None) / 255 if k.startswith("x") else v)
                for k, v in arrays.items()}
    np.savez(tmp_path / "f32.npz", **as_float)
    a = _load(tmp_path / "u8.npz", tmp_path / "cache", order_seed=None)
    b = _load(tmp_path / "f32.npz", tmp_path / "cache", order_seed=None)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert torch.equal(a.train.images, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(a.train.labels, torch.from_numpy(arrays["y_train"]))
    assert a.class_names == [f"c{i}" for i in range(10)]
    assert b.class_names == [str(i) for i in range(10)] and b.num_classes == 10
    assert a.image_size == 16


def test_cache_and_order_seed(tmp_path):
    """Decoded once into the dataset cache (keyed by the file's contents); the training
    split is shuffled after the cache with order_seed, as the folder datasets are."""
    arrays = _digits(80, 20)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    cache = tmp_path / "cache"
    kept = _load(path, cache, order_seed=None)
    assert kept.train_order is None
    assert len(list((resolve_cache_dir(cache) / "datasets").glob("arrays-*.npz"))) == 1
    shuffled = _load(path, cache, order_seed=3)
    perm = shuffled.train_order
    assert perm is not None and not torch.equal(perm, torch.arange(80))
    assert torch.equal(shuffled.train.images, kept.train.images[perm])
    assert torch.equal(_load(path, cache, order_seed=3).train_order, perm)  # same seed, same order
    # the cache serves the file's contents: a rewritten file is read again
    arrays["y_train"] = (arrays["y_train"] + 1) % 10
    np.savez(path, **arrays)
    assert torch.equal(_load(path, cache, order_seed=None).train.labels, torch.from_numpy(arrays["y_train"]))


def _bad(kind: str) -> dict:
    a = _digits(40, 10)
    if kind == "int32 images":
        a["x_train"] = a["x_train"].astype(np.int32)
    elif kind == "uint8 channels first":
        a["x_train"] = a["x_train"].transpose(0, 3, 1, 2).copy()
    elif kind == "float channels last":
        a["x_train"] = a["x_train"].astype(np.float32) / 255
    elif kind == "3-D images":
        a["x_train"] = a["x_train"][..., 0]
    elif kind == "float 0-255":
        a["x_test"] = a["x_test"].transpose(0, 3, 1, 2).astype(np.float32)
        a["x_train"] = a["x_train"].transpose(0, 3, 1, 2).astype(np.float32)
    elif kind == "label out of range":
        a["y_test"] = a["y_test"].copy()
        a["y_test"][3] = 10
        a["class_names"] = np.array([str(i) for i in range(10)])
    elif kind == "negative label":
        a["y_train"] = a["y_train"].copy()
        a["y_train"][0] = -1
    elif kind == "float labels":
        a["y_train"] = a["y_train"].astype(np.float32)
    elif kind == "one-hot labels":
        a["y_train"] = np.eye(10, dtype=np.int64)[a["y_train"]]
    elif kind == "length mismatch":
        a["y_train"] = a["y_train"][:-1]
    elif kind == "object array":
        a["class_names"] = np.array(["a", 1, None] + [str(i) for i in range(7)], dtype=object)
    elif kind == "missing key":
        del a["y_test"]
    elif kind == "one class":
        a["y_train"] = np.zeros_like(a["y_train"])
        a["y_test"] = np.zeros_like(a["y_test"])
    elif kind == "sizes differ":
        a["x_test"] = a["x_test"][:, :8, :8]
    return a


BAD = {
    "int32 images": "dtype int32",
    "uint8 channels first": "(N, H, W, 3)",
    "float channels last": "(N, 3, H, W)",
    "3-D images": "4 dimensions",
    "float 0-255": "must be in [0, 1] (divide by 255)",
    "label out of range": "label 10, out of range for 10 class_names",
    "negative label": "label -1",
    "float labels": "labels must be integers",
    "one-hot labels": "1-D",
    "length mismatch": "39 labels but there are 40 images",
    "object array": "object array",
    "missing key": "lacks 'y_test'",
    "one class": "at least 2",
    "sizes differ": "train images are 16x16 but test images are 8x8",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_arrays_get_one_line_errors(tmp_path, kind):
    path = tmp_path / "bad.npz"
    np.savez(path, **_bad(kind))
    with pytest.raises(DataError) as info:
        _load(path, tmp_path / "cache")
    message = str(info.value)
    assert BAD[kind] in message and "\n" not in message and str(path) in message


def test_bad_files_through_the_cli(tmp_path, capsys):
    """A missing file, a pickle posing as .npz and an object array: one line each, exit 2,
    and the pickle is never run."""
    import pickle

    marker = tmp_path / "ran"
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(_Boom(str(marker))))
    np.savez(tmp_path / "obj.npz", **_bad("object array"))
    for path, needle in (("absent.npz", "does not exist; set dataset.path"), ("evil.npz", "not a readable .npz"),
                         ("obj.npz", "'class_names' is an object array")):
        cfg = {"dataset": {"name": "arrays", "path": path}, "model": {"name": "small_cnn", "width": 8},
               "defense": {"name": "none", "epochs": 1}, "train": {"progress": False},
               "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}}
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        code = main(["run", str(tmp_path / "cfg.yaml")])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and lines[0].startswith("abl: error: "), lines
    assert not marker.exists()


class _Boom:
    """Unpickling this would create a file: the check that nothing unpickles user bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

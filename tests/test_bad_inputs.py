"""Bad data and configs fail loudly, in one line, before any long work; none is silently corrupted.

Each test builds its own tiny input in ``tmp_path`` and runs in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from abl.attacks import ATTACKS
from abl.cli import main
from abl.config import load_yaml
from abl.data import imageio
from abl.data.cache import tree_fingerprint
from abl.data.datasets import Digits, ImageFolder
from abl.errors import ConfigError, DataError
from abl.experiment import load_experiment
from abl.store import RunStore


def make_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 3, size: int = 12) -> Path:
    """``root/{train,test}/<class>/<i>.png``: flat images whose grey level differs per file."""
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), 20 * i + 60 * c, np.uint8)).save(d / f"{i}.png")
    return root


def write_config(path: Path, tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "bad-input",
        "dataset": {"name": "digits"},
        "model": {"name": "small_cnn", "width": 4},
        "attack": None,
        "defense": {"name": "none", "epochs": 1},
        "train": {"progress": False, "batch_size": 64},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
    }
    cfg.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("abl: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def no_data_load(monkeypatch):
    """Make loading any dataset fail the test: the error must come before the data loads."""

    def refuse(self, cache_dir=None):
        raise AssertionError("the data was loaded before the bad input was reported")

    for cls in (Digits, ImageFolder):
        monkeypatch.setattr(cls, "load", refuse)


# --------------------------------------------------------------------------- images


def test_16bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    levels = np.array([[0, 257 * 40], [32768, 65535]], np.uint16)  # 0, 40, ~128, 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # what Pillow gives for a 16-bit grayscale PNG
    out = imageio.decode_image(tmp_path / "g16.png", 2)
    assert out[:, :, 0].tolist() == [[0, 40], [128, 255]]
    assert (out == out[:, :, :1]).all()  # grey stays grey


def test_symlink_loop_in_a_class_folder_reads_each_image_once(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    a = root / "train" / "a"
    os.symlink(".", a / "loop")  # a/loop/loop/... until the OS's 40-level limit
    os.symlink("0.png", a / "alias.png")  # the same file under a second name
    assert imageio.list_images(a) == [a / "0.png", a / "1.png"]
    # the cache key walks the tree too: once, with the loop entered no second time
    fingerprint = tree_fingerprint(root / "train")
    assert int(fingerprint.split(":")[0]) < 12
    splits = ImageFolder(root=str(root), size=8, order_seed=None).load(cache_dir=tmp_path / "cache")
    assert splits.train.labels.tolist() == [0, 0, 1, 1]


def test_single_class_training_set_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", classes=("only",))
    monkeypatch.setattr(imageio, "decode_images", lambda *a, **k: pytest.fail("decoded a one-class folder"))
    with pytest.raises(DataError, match="one class folder \\('only'\\); a classifier needs at least 2"):
        ImageFolder(root=str(root), size=8).load(cache_dir=tmp_path / "cache")


def test_slice_down_to_one_class_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, slice={"train": 1})
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "one class only", "slice.train")
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_non_utf8_file_name_is_one_line_error(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    Image.new("RGB", (12, 12)).save(os.fsencode(root / "train" / "a") + b"/caf\xe9.png")
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, dataset={"name": "imagefolder", "root": str(root), "size": 8})
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "caf\\xe9.png", "not valid UTF-8", "rename")


# --------------------------------------------------------------------------- checked before the data loads


def test_image_size_too_small_for_the_model_fails_before_loading(tmp_path, capsys, no_data_load):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, dataset={"name": "digits", "size": 3})
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "model 'small_cnn' cannot take 3x3 images", "dataset.size")
    assert not (tmp_path / "runs").exists()


def test_unwritable_runs_folder_fails_before_loading(tmp_path, capsys, no_data_load):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path)
    code, err = run_cli(["run", str(cfg), "--runs-dir", str(tmp_path / "a-file" / "runs")], capsys)
    assert_one_line_error(code, err, "a-file", "is a file", "--runs-dir")


def test_runs_folder_without_write_permission_fails_before_loading(tmp_path, capsys, no_data_load, monkeypatch):
    # root may write anywhere, so the permission bits alone cannot show this when tests run as root
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path)
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "cannot be written", str(tmp_path))


def test_sig_pattern_file_as_npz_is_read(tmp_path):
    j = np.arange(16, dtype=np.float32)
    signal = np.tile(20 * np.sin(2 * np.pi * j * 3 / 16), (16, 1)).astype(np.float32)
    np.savez(tmp_path / "sig.npz", x=signal)
    np.save(tmp_path / "sig.npy", signal)
    from_npz = ATTACKS.create({"name": "sig", "pattern_file": str(tmp_path / "sig.npz")})
    from_npy = ATTACKS.create({"name": "sig", "pattern_file": str(tmp_path / "sig.npy")})
    from_npz.setup(16, 10)
    from_npy.setup(16, 10)
    assert torch.equal(from_npz.signal, from_npy.signal) and from_npz.signal.abs().max() > 0.05


def test_bad_sig_pattern_files_fail_before_loading(tmp_path, capsys, no_data_load):
    np.savez(tmp_path / "wrong-size.npz", x=np.zeros((8, 8), np.float32))
    np.savez(tmp_path / "empty.npz")
    Image.new("RGB", (16, 16)).save(tmp_path / "picture.png")
    cases = (("wrong-size.npz", "expected (16, 16)"), ("empty.npz", "without arrays"), ("picture.png", ".npy or .npz"))
    for name, needle in cases:
        attack = {"name": "sig", "pattern_file": str(tmp_path / name)}
        cfg = write_config(tmp_path / "cfg.yaml", tmp_path, attack=attack)
        code, err = run_cli(["run", str(cfg)], capsys)
        assert_one_line_error(code, err, "attack.pattern_file", name, needle)


# --------------------------------------------------------------------------- configs


def test_duplicate_yaml_key_is_refused_with_its_name(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nattack:\n  name: badnets\n  rate: 0.1\n  target: 0\n  rate: 0.5\n")
    with pytest.raises(ConfigError, match="duplicate key 'rate' \\(line 6\\)"):
        load_yaml(path)
    # a key brought in by a merge may still be overridden: that is what merges are for
    path.write_text("base: &b {rate: 0.1, target: 0}\nattack:\n  <<: *b\n  rate: 0.2\n")
    assert load_yaml(path)["attack"] == {"rate": 0.2, "target": 0}


def test_relative_paths_in_a_config_are_read_against_its_folder(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    make_folder(project / "data" / "imgs")
    (project / "triggers").mkdir()
    Image.new("RGB", (3, 3), (255, 0, 255)).save(project / "triggers" / "patch.png")
    cfg = write_config(
        project / "configs" / "run.yaml",
        tmp_path,
        dataset={"name": "imagefolder", "root": "../data/imgs", "size": 8},
        attack={"name": "badnets", "rate": 0.2, "size": 3, "pattern_file": "../triggers/patch.png"},
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = run_cli(["run", str(cfg)], capsys)
    assert code == 0, err
    saved = RunStore(tmp_path / "runs").list_runs()[0].config  # the run's config.yaml
    assert Path(saved["dataset"]["root"]).resolve() == (project / "data" / "imgs").resolve()
    assert Path(saved["attack"]["pattern_file"]).resolve() == (project / "triggers" / "patch.png").resolve()
    assert Path(saved["dataset"]["root"]).is_absolute() and Path(saved["attack"]["pattern_file"]).is_absolute()
    # --set values are typed in the shell, so they stay relative to the current directory
    exp = load_experiment(cfg, ["dataset.root=mine"])
    assert exp.dataset.root == str(elsewhere / "mine")

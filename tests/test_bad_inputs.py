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


# --------------------------------------------------------------------------- issue 28: config values

ABL_TINY = {"name": "abl", "isolation_count": "fixed", "isolation_epochs": 1, "recovery_epochs": 1, "unlearning_epochs": 1, "isolation_rate": 0.1}


def finished_runs(tmp_path: Path) -> list:
    runs = tmp_path / "runs"
    return RunStore(runs).list_runs(status="finished") if runs.is_dir() else []


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
def test_a_non_finite_float_is_refused_naming_the_key(tmp_path, capsys, no_data_load, value):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={"name": "abl"})
    code, err = run_cli(["run", str(cfg), "--set", f"defense.gamma={value}"], capsys)
    assert_one_line_error(code, err, "'defense.gamma' must be a finite number")
    # in any component, through the same coercion: an attack's and the training config's
    code, err = run_cli(["run", str(cfg), "--set", f"attack={{name: blend, alpha: {value}}}"], capsys)
    assert_one_line_error(code, err, "'attack.alpha' must be a finite number")
    code, err = run_cli(["run", str(cfg), "--set", f"train.weight_decay={value}"], capsys)
    assert_one_line_error(code, err, "'train.weight_decay' must be a finite number")
    assert not (tmp_path / "runs").exists()


def test_an_unbounded_ceiling_may_still_be_written_inf():
    exp = load_experiment_from(
        {"defense": {"name": "abl", "unlearning_ceiling": ".inf"}}, ["defense.unlearner={name: gga, ceiling: .inf}"]
    )
    assert exp.defense.unlearning_ceiling == float("inf")
    assert exp.defense.unlearner_part().ceiling == float("inf")
    with pytest.raises(ConfigError, match="'defense.unlearning_ceiling' must be a finite number, got -inf"):
        load_experiment_from({"defense": {"name": "abl", "unlearning_ceiling": "-.inf"}})


def load_experiment_from(raw_over: dict, overrides: list[str] | None = None):
    """An experiment from YAML text, so that the values go through the YAML loader."""
    import tempfile

    base = {"name": "x", "dataset": {"name": "digits"}, "model": {"name": "small_cnn"}, "defense": {"name": "none"}}
    text = yaml.safe_dump({**base, **{k: v for k, v in raw_over.items()}})
    # unquote the YAML scalars written as strings above (".inf", "1e30"), as a user types them
    text = text.replace("'", "")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        return load_experiment(path, overrides or [])


def test_epoch_and_step_counts_have_an_upper_bound_that_says_why(tmp_path, capsys, no_data_load):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={"name": "abl"})
    code, err = run_cli(["run", str(cfg), "--set", "defense.isolation_epochs=1000000000000"], capsys)
    assert_one_line_error(code, err, "'defense.isolation_epochs' must be at most 10,000", "can only be a typo")
    code, err = run_cli(["run", str(cfg), "--set", "defense={name: none, epochs: 10001}"], capsys)
    assert_one_line_error(code, err, "'defense.epochs' must be at most 10,000")
    code, err = run_cli(["run", str(cfg), "--set", "attack={name: lba, steps: 2000000}"], capsys)
    assert_one_line_error(code, err, "'attack.steps' must be at most 1,000,000")
    # the bound itself is allowed
    assert load_experiment(cfg, ["defense={name: none, epochs: 10000}"]).defense.epochs == 10_000


@pytest.mark.parametrize(
    "milestones, needle",
    [("[-5, 99]", "milestone -5 would apply before the first epoch"), ("[99]", "milestone 99 would never take effect"),
     ("[30, 20]", "increasing order"), ("[20, 20]", "increasing order")],
)
def test_recovery_milestones_must_be_increasing_epochs_inside_the_phase(tmp_path, capsys, no_data_load, milestones, needle):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={"name": "abl", "recovery_epochs": 60})
    code, err = run_cli(["run", str(cfg), "--set", f"defense.recovery_milestones={milestones}"], capsys)
    assert_one_line_error(code, err, "'defense.recovery_milestones'", needle)
    assert load_experiment(cfg, ["defense.recovery_milestones=[20, 40]"]).defense.recovery_milestones == [20, 40]


def test_a_stored_config_with_a_shortened_recovery_still_loads(tmp_path, no_data_load):
    """A run's saved config writes the preset's milestones out ([40] for 60 epochs); with a
    shorter recovery they never take effect, and resuming or rerunning it must not refuse them."""
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={"name": "abl", "recovery_epochs": 2})
    resolved = load_experiment(cfg).resolved()
    assert resolved["defense"]["recovery_milestones"] == [40]
    stored = tmp_path / "stored.yaml"
    stored.write_text(yaml.safe_dump(resolved))
    assert load_experiment(stored).defense.recovery_milestones == [40]


def test_abl_without_unlearning_is_refused_unless_asked_for_by_name(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={**ABL_TINY, "unlearning_epochs": 0})
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "ABL without unlearning is not ABL", "defense.unlearning=none")
    assert finished_runs(tmp_path) == []
    # the explicit opt-in: isolation and recovery only, recorded as such
    code, err = run_cli(["run", str(cfg), "--set", "defense.unlearning=none"], capsys)
    assert code == 0, err
    (rec,) = finished_runs(tmp_path)
    assert rec.config["defense"]["unlearning"] == "none" and rec.config["defense"]["unlearning_epochs"] == 0
    with pytest.raises(ConfigError, match="must be 0 with unlearning: none, got 3"):
        load_experiment(cfg, ["defense.unlearning=none", "defense.unlearning_epochs=3"])
    with pytest.raises(ConfigError, match="'defense.unlearner' must be null with unlearning: none"):
        load_experiment(cfg, ["defense.unlearning=none", "defense.unlearning_epochs=0", "defense.unlearner={name: gga}"])


def test_an_isolation_rate_that_isolates_no_example_is_refused_with_the_count(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={**ABL_TINY, "isolation_rate": 1e-6})
    code, err = run_cli(["run", str(cfg)], capsys)
    n = len(Digits().load(cache_dir=tmp_path / "cache").train)
    assert_one_line_error(code, err, "'defense.isolation_rate' 1e-06", f"of the {n} training examples",
                          f"isolates {n * 1e-6:.3g} examples (< 1)")
    assert finished_runs(tmp_path) == []


def test_seed_out_of_range_is_one_line_error_naming_the_range(tmp_path, capsys, no_data_load):
    for seed in (2**70, 2**32, -1):
        cfg = write_config(tmp_path / "cfg.yaml", tmp_path, seed=seed)
        code, err = run_cli(["run", str(cfg)], capsys)
        assert_one_line_error(code, err, "'seed' must be between 0 and 4294967295", str(seed))
    code, err = run_cli(["run", str(cfg), "--set", "seed=0", "--set", "attack={name: badnets, seed: 99999999999}"], capsys)
    assert_one_line_error(code, err, "'attack.seed' must be between 0 and 4294967295")
    assert load_experiment(cfg, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


# --------------------------------------------------------------------------- issue 28: config files


@pytest.mark.parametrize(
    "encode, needle",
    [(lambda t: t.encode("utf-16"), "is UTF-16"), (lambda t: t.encode("utf-16-le"), "is UTF-16"),
     (lambda t: t.replace("bad-input", "caf\xe9").encode("latin-1"), "has a byte that is not UTF-8 (0xe9 on line")],
)
def test_a_config_not_in_utf8_is_one_line_error(tmp_path, capsys, encode, needle):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path)
    cfg.write_bytes(encode(cfg.read_text()))
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, str(cfg), needle, "save it as UTF-8")


def test_a_config_path_that_is_a_directory_says_so(tmp_path, capsys):
    code, err = run_cli(["run", str(tmp_path)], capsys)
    assert_one_line_error(code, err, f"'{tmp_path}' is a directory")
    assert "does not exist" not in err


def test_every_yaml_1_2_number_form_is_a_number_in_files_and_overrides(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(  # YAML 1.1 reads each of these as a string
        "dataset: {name: digits}\nmodel: {name: small_cnn}\n"
        "defense: {name: abl, isolation_lr: 1e30, recovery_lr: 1E-3, unlearning_lr: .5e2, gamma: +1e0}\n"
    )
    d = load_experiment(cfg, ["defense.min_label_share=5E-1", "defense.unlearning_ceiling=+4.5e0"]).defense
    assert (d.isolation_lr, d.recovery_lr, d.unlearning_lr, d.gamma) == (1e30, 1e-3, 50.0, 1.0)
    assert (d.min_label_share, d.unlearning_ceiling) == (0.5, 4.5)
    # negative exponents and signs, YAML 1.2's octal; text that only looks numeric stays text
    assert load_yaml_text("a: -2e-1\nb: 0o17\nc: 1e\nd: 10^12\ne: 1.2.3\n") == {
        "a": -0.2, "b": 15, "c": "1e", "d": "10^12", "e": "1.2.3"}


def load_yaml_text(text: str):
    from abl.config import safe_load_unique

    return safe_load_unique(text)


# --------------------------------------------------------------------------- issue 28: data and cache


def test_a_link_between_class_folders_is_an_error_naming_both_labels(tmp_path, capsys):
    root = make_folder(tmp_path / "d", classes=("cat", "dog"))
    os.symlink("..", root / "train" / "cat" / "up")  # cat/up/dog/0.png is dog/0.png
    with pytest.raises(DataError) as info:
        imageio.scan_class_folders(root / "train")
    msg = str(info.value)
    assert "in class 'dog'" in msg and "in class 'cat'" in msg and "cat/up/dog/0.png" in msg and "remove the link" in msg
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, dataset={"name": "imagefolder", "root": str(root), "size": 8})
    code, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "a link between class folders")
    assert finished_runs(tmp_path) == []
    # a linked class folder is still followed, each file once under its one label
    (root / "train" / "cat" / "up").unlink()
    outside = make_folder(tmp_path / "elsewhere", classes=("bird",))
    os.symlink(outside / "train" / "bird", root / "train" / "bird")
    paths, labels, classes = imageio.scan_class_folders(root / "train")
    assert classes == ["bird", "cat", "dog"] and labels == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(set(paths)) == 9


def test_a_pickled_cache_file_is_rebuilt_without_suggesting_allow_pickle(tmp_path):
    from abl.data.cache import cache_path, load_cached

    splits = Digits().load(cache_dir=tmp_path / "cache")
    path = cache_path(tmp_path / "c2", "digits", {"k": 1}, "fp")
    path.parent.mkdir(parents=True)
    # every array a cache file has, one of them pickled objects (what a foreign or tampered file may hold)
    arrays = {k: np.zeros(1) for k in ("train_labels", "test_images", "test_labels", "class_names", "num_classes")}
    np.savez(path, train_images=np.array([{"x": 1}], dtype=object), **arrays)
    built = []
    with pytest.warns(UserWarning) as caught:
        out = load_cached("digits", {"k": 1}, "fp", lambda: built.append(1) or splits, cache_dir=tmp_path / "c2")
    (message,) = [str(w.message) for w in caught if "dataset cache" in str(w.message)]
    assert "allow_pickle" not in message and "pickled Python objects, which abl never loads" in message
    assert built == [1] and out is splits


# --------------------------------------------------------------------------- issue 28: processes

CLI = "import sys; from abl.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigint_stops_a_run_started_with_sigint_ignored_as_interrupted(tmp_path):
    """`abl run &` in a script: the shell starts the job with SIGINT ignored; Ctrl-C (SIGINT)
    must still stop it as it stops SIGTERM: interrupted, resumable, nothing finished."""
    import signal
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path, defense={"name": "none", "epochs": 400},
                       train={"progress": False, "batch_size": 256, "eval_every": 0, "threads": 1})
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "run", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        while True:  # until it is inside the training loop (two epochs logged)
            hist = list(runs.glob("*/history.jsonl"))
            if hist and len(hist[0].read_text().splitlines()) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the signal: {proc.communicate()}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "abl: interrupted" and "continue it with: abl resume" in err
    (rec,) = RunStore(runs).list_runs()
    assert rec.status == "interrupted" and not (rec.path / "metrics.json").exists()


def _alive(pid: int, start: str) -> bool:
    from abl.sweep import _proc_stat

    st = _proc_stat(pid)
    return st is not None and st[1] == start


@pytest.mark.xdist_group("ray")
def test_a_sweep_driver_killed_with_sigkill_leaves_no_ray_process_after_the_next_sweep(tmp_path):
    """Ray's agents (DashboardAgent, RuntimeEnvAgent) outlive a driver killed with SIGKILL and
    ignore SIGTERM: the next `abl sweep` stops every process the killed one started."""
    import signal
    import subprocess
    import sys

    from abl.sweep import _descendants

    grid = tmp_path / "grid.yaml"
    base = {"name": "g", "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 4},
            "attack": {"name": "badnets", "rate": 0.1}, "defense": {"name": "none", "epochs": 2},
            "train": {"batch_size": 128, "progress": False, "eval_subset": 0, "checkpoint_every_s": 0},
            "output": {"cache_dir": str(tmp_path / "cache")}}
    grid.write_text(yaml.safe_dump({"name": "g", "base": base, "axes": {"attack.rate": [0.05, 0.1]}}))
    cmd = [sys.executable, "-c", CLI, "sweep", str(grid), "--runs-dir", str(tmp_path / "runs"), "--num-cpus", "1",
           "--max-concurrent", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in driver.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if line.startswith("[1/2 done"):  # Ray is up, a worker has run a cell, the second is running
            break
    else:
        pytest.fail("the sweep ended before its first cell finished:\n" + "".join(seen))
    started = _descendants(driver.pid)
    names = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid, _ in started}
    assert b"ray::DashboardAgent" in names, names  # what used to be left behind
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    try:
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Ray processes left running by a sweep that was killed" in again.stdout
        left = [pid for pid, start in started if _alive(pid, start)]
        assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]
    finally:
        for pid, start in started:  # never leave them to the next test, pass or fail
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)

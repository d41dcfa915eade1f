"""The command line: every bad input gives one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from abl.cli import main
from abl.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_config(tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "cli-test",
        "dataset": {"name": "digits"},
        "model": {"name": "small_cnn", "width": 8},
        "attack": {"name": "badnets", "rate": 0.1},
        "defense": {"name": "none", "epochs": 1},
        "train": {"progress": False, "batch_size": 128},
        "output": {"runs_dir": str(tmp_path / "runs")},
    }
    cfg.update(over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    # warnings the run gave before it failed come as their own `abl: warning:` lines
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("abl: warning: ")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("abl: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_list_shows_every_registry(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for word in ("badnets", "sig", "trojan", "blend", "abl", "none", "wrn", "resnet34", "cifar10", "gtsrb", "digits", "imagefolder"):
        assert word in out


def test_list_shows_a_components_parameters(capsys):
    """``abl list attack badnets``: every parameter, its default as YAML, its description
    from the docstrings (wrapped on the lines below it)."""
    import dataclasses

    from abl.attacks.badnets import BadNets

    code, out, _ = run_cli(["list", "attack", "badnets"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("attack badnets: BadNets")
    params: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("  ") and not line.startswith("   "):  # a parameter's heading
            name = line.split(":")[0].strip()
            params[name] = line
        else:  # its description, indented further
            params[name] += " " + line.strip()
    assert list(params) == [f.name for f in dataclasses.fields(BadNets)]  # base Attack's fields too
    assert "= 0.1" in params["rate"] and "poisoned" in params["rate"]  # documented on the base class
    assert "'grid' | 'white' | 'random' = grid" in params["pattern"] and "seeded binary noise" in params["pattern"]
    assert "= null" in params["pattern_file"] and "patch" in params["pattern_file"]
    code, out, _ = run_cli(["list", "models"], capsys)
    assert code == 0 and out.startswith("models: ") and "wrn" in out and "badnets" not in out
    code, _, err = run_cli(["list", "attack", "badnet"], capsys)
    assert_one_line_error(code, err, "unknown attack 'badnet'", "badnets")
    code, _, err = run_cli(["list", "gadget"], capsys)
    assert_one_line_error(code, err, "unknown kind 'gadget'", "attack")


def test_run_records_a_finished_run(tmp_path, capsys):
    cfg = write_config(tmp_path)
    code, out, err = run_cli(["run", str(cfg), "--set", "defense.epochs=2", "--set", "name=override"], capsys)
    assert code == 0, err
    runs = RunStore(tmp_path / "runs").list_runs()
    assert len(runs) == 1 and runs[0].status == "finished" and runs[0].name == "override"
    rec = runs[0]
    assert rec.config["defense"]["epochs"] == 2
    assert isinstance(rec.final_metrics["clean_acc"], float)
    assert rec.metrics["attack"]["poison_s"] >= 0 and "fit_backdoor_acc" not in rec.metrics["attack"]
    assert rec.array("example_losses").shape[0] == 2
    assert rec.array("poison_mask").sum() == round(0.1 * len(rec.array("poison_mask")))
    assert (rec.path / "model.safetensors").is_file() and (rec.path / "config.yaml").is_file()
    assert rec.meta["seed"] == 0 and rec.meta["abl_version"]
    assert "override" in out and "finished" in out

    code, out, _ = run_cli(["report", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0 and (tmp_path / "rep" / "report.md").is_file()
    assert "override" in (tmp_path / "rep" / "report.md").read_text()


def test_run_with_generated_trigger_stores_what_was_generated(tmp_path, capsys):
    """An optimised attack (dynamic) through the CLI: its generators are saved with the run
    (safetensors) and its fit is reported under the ``attack`` phase."""
    from safetensors.torch import load_file

    attack = {"name": "dynamic", "rate": 0.1, "surrogate_model": "small_cnn", "surrogate_epochs": 2,
              "surrogate_batch_size": 64, "mask_epochs": 1, "generator_width": 4, "cache_dir": str(tmp_path / "cache")}
    cfg = write_config(tmp_path, attack=attack)
    code, _, err = run_cli(["run", str(cfg)], capsys)
    assert code == 0, err
    rec = RunStore(tmp_path / "runs").list_runs()[0]
    phase = rec.metrics["attack"]
    assert phase["poison_s"] > 0 and 0 <= phase["fit_backdoor_acc"] <= 1 and "fit_cross_acc" in phase
    saved = load_file(str(rec.path / "trigger.safetensors"))
    assert any(k.startswith("pattern.") for k in saved) and any(k.startswith("mask.") for k in saved)
    assert len(list((tmp_path / "cache" / "attacks").glob("dynamic-*.safetensors"))) == 1
    code, _, _ = run_cli(["report", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0 and re.search(r"\| Poisoning time \| \d+\.\d s \|", (tmp_path / "rep" / "report.md").read_text())


@pytest.mark.parametrize(
    "over, needles",
    [
        ({"bogus": 1}, ["unknown key 'bogus'"]),
        ({"attack": {"name": "badnet"}}, ["unknown attack 'badnet'", "badnets"]),
        ({"defense": {"name": "abl", "gamma": "high"}}, ["defense.gamma"]),
        ({"dataset": {"name": "cifar10", "root": "/nonexistent/cifar"}}, ["/nonexistent/cifar", "download"]),
        ({"attack": {"name": "badnets", "target": 10}}, ["attack.target", "10 classes"]),
        ({"attack": {"name": "trojan", "trigger_file": "/nonexistent/t.npz"}}, ["/nonexistent/t.npz"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, over, needles):
    cfg = write_config(tmp_path, **over)
    code, _, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, *needles)
    store = tmp_path / "runs"
    if store.exists():
        assert all(r.status != "finished" for r in RunStore(store).list_runs())


def test_bad_override_and_missing_config(tmp_path, capsys):
    cfg = write_config(tmp_path)
    code, _, err = run_cli(["run", str(cfg), "--set", "train.batch_size=big"], capsys)
    assert_one_line_error(code, err, "train.batch_size")
    code, _, err = run_cli(["run", str(tmp_path / "missing.yaml")], capsys)
    assert_one_line_error(code, err, "missing.yaml", "does not exist")


def test_corrupt_image_names_the_file(tmp_path, capsys):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = write_config(
        tmp_path,
        dataset={"name": "imagefolder", "root": str(root), "size": 16},
        output={"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
    )
    code, _, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "broken.png")


def test_divergence_is_reported_and_run_marked_failed(tmp_path, capsys):
    cfg = write_config(
        tmp_path,
        defense={
            "name": "abl",
            "isolation_epochs": 1,
            "recovery_epochs": 0,
            "unlearning_ceiling": float("inf"),  # the default preset bounds the ascent at 4
            "unlearning": "ascent",
            "unlearning_epochs": 30,
            "unlearning_lr": 1e8,
            "carry_momentum": False,
        },
        attack={"name": "badnets", "rate": 0.3},
        train={"progress": False, "batch_size": 128, "eval_every": 0},
    )
    code, _, err = run_cli(["run", str(cfg)], capsys)
    assert_one_line_error(code, err, "diverged")
    runs = RunStore(tmp_path / "runs").list_runs()
    assert [r.status for r in runs] == ["failed"]
    assert not runs[0].metrics


def test_report_on_missing_store(tmp_path, capsys):
    code, _, err = run_cli(["report", "--runs-dir", str(tmp_path / "none")], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_console_script_entry_point(tmp_path):
    """The installed `abl` command exists and exits non-zero with one line on bad input."""
    exe = Path(sys.executable).with_name("abl")
    assert exe.is_file(), "pip install -e . must install the abl console script"
    proc = subprocess.run([str(exe), "run", str(tmp_path / "x.yaml")], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_own_images_without_attack_lists_isolated_files(tmp_path, capsys):
    """The practitioner's flow: an image folder, no known attack; the isolated examples
    come back as file paths (also when the dataset is read from the cache)."""
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("val", 6)):
        for c in ("cats", "dogs"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{c}{i}.png")
    cfg = write_config(
        tmp_path,
        dataset={"name": "imagefolder", "root": str(root), "size": 16},
        attack=None,
        defense={"name": "abl", "isolation_count": "fixed", "isolation_epochs": 1, "recovery_epochs": 1,
                 "unlearning_epochs": 1, "isolation_rate": 0.1},
        output={"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
    )
    for _ in range(2):  # the second run reads the decoded dataset from the cache
        code, _, err = run_cli(["run", str(cfg)], capsys)
        assert code == 0, err
    store = RunStore(tmp_path / "runs")
    for rec in store.list_runs():
        files = rec.array("isolated_files")
        assert len(files) == 6 and all(str(f).startswith("train/") and (root / str(f)).is_file() for f in files)
        assert not rec.has_array("isolated_is_poison")
        assert rec.config["attack"] is None
    code, _, _ = run_cli(["report", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0
    csv_text = next((tmp_path / "rep").glob("*-isolated.csv")).read_text().splitlines()
    assert csv_text[0] == "index,loss,is_poison,file"
    assert csv_text[1].split(",")[2] == "" and csv_text[1].split(",")[3].startswith("train/")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`abl list | head`: the reader has left before abl writes; no BrokenPipe traceback."""
    code = "import sys; from abl.cli import main; sys.exit(main(sys.argv[1:]))"
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        out = subprocess.run([sys.executable, "-c", code, "list", "attack", "badnets"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 141, out.stderr
    assert out.stderr == "", out.stderr

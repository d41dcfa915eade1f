"""The documented Python API (``abl.run``, ``abl.load_model``, ``abl.open_store``): the
README's snippet runs as written; the offline example configs load, and a missing local
copy or a failed download gives one line naming the config key, leaving no folder behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import abl
from abl.cli import main
from abl.errors import StoreError
from abl.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_snippet(name: str) -> str:
    """The ```python block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- {name}:start -->\s*```python\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert m, f"README has no ```python block between the {name} markers"
    return m.group(1)


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    """Run the README's snippet as a user would paste it, in an empty folder."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(readme_snippet("python-api"), "README.md", "exec"), ns)  # noqa: S102
    out = capsys.readouterr().out
    record, model, store = ns["record"], ns["model"], ns["store"]
    assert record.status == "finished" and (tmp_path / "runs" / record.run_id / "model.safetensors").is_file()
    assert model.classes == [str(i) for i in range(10)]
    assert [r.run_id for r in store.list_runs()] == [record.run_id]
    assert record.run_id in out  # the snippet prints what it shows


def test_run_takes_a_path_a_mapping_or_an_experiment(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = {"name": "api", "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 4},
           "defense": {"name": "none", "epochs": 1}, "train": {"progress": False, "threads": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    a = abl.run(tmp_path / "c.yaml", overrides=["name=from-file"], runs_dir=runs)
    b = abl.run(cfg, runs_dir=runs)
    exp = load_experiment(None, base=cfg)
    exp.output.runs_dir = str(runs)
    c = abl.run(exp)
    assert (a.name, b.name, c.name) == ("from-file", "api", "api")
    assert {r.run_id for r in abl.open_store(runs).list_runs(status="finished")} == {a.run_id, b.run_id, c.run_id}
    with pytest.raises(StoreError, match="does not exist"):
        abl.open_store(tmp_path / "absent")
    with pytest.raises(TypeError):
        abl.run(42)


def test_import_abl_stays_light():
    code = "import sys, abl; assert 'torch' not in sys.modules, 'torch'; abl.load_model; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


LOCAL = REPO / "configs" / "cifar10-badnets-abl-local.yaml"


def test_offline_example_configs_load():
    exp = load_experiment(LOCAL)
    assert exp.dataset.download is False and exp.dataset.root == str((REPO / "data" / "cifar10").resolve())
    assert (exp.slice.train, exp.slice.test, exp.train.threads) == (5000, 1000, 2)
    arrays = load_experiment(REPO / "configs" / "arrays-abl.yaml")
    assert arrays.dataset.path == str((REPO / "data" / "my-arrays.npz").resolve()) and arrays.attack is None


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("abl: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_local_copy_is_one_line_and_creates_nothing(tmp_path, capsys):
    absent = tmp_path / "nowhere" / "cifar10"
    code = main(["run", str(LOCAL), "--set", f"dataset.root={absent}", "--runs-dir", str(tmp_path / "runs")])
    _one_line(code, capsys.readouterr().err, str(absent), "does not exist", "set dataset.root to a local copy")
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "runs").exists()


def test_failed_download_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    """`download: true` without a network: one line saying how to work offline, and the
    folders the download made are gone (an empty one used to stay behind)."""
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        Path(args[0], "cifar-10-python.tar.gz").write_bytes(b"partial")  # what a cut download leaves
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    target = tmp_path / "new" / "cifar10"
    code = main(["run", str(LOCAL), "--set", f"dataset.root={target}", "--set", "dataset.download=true",
                 "--runs-dir", str(tmp_path / "runs")])
    _one_line(code, capsys.readouterr().err, "downloading CIFAR-10", "dataset.download: false")
    assert not (tmp_path / "new").exists()
    # into a folder the user made: it stays, and only what the download wrote goes
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code = main(["run", str(LOCAL), "--set", f"dataset.root={mine}", "--set", "dataset.download=true",
                 "--runs-dir", str(tmp_path / "runs")])
    _one_line(code, capsys.readouterr().err, "dataset.download: false")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

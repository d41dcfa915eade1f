"""``benchmarks/full_scale.py`` runs end to end on a CPU slice and writes its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_scale():
    spec = importlib.util.spec_from_file_location("full_scale", REPO / "benchmarks" / "full_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_presets_scale_their_epochs(full_scale):
    full = full_scale.defense_spec("paper", 1.0)
    assert full == {"name": "abl", "preset": "paper"}, "at full scale a preset runs exactly as shipped"
    small = full_scale.defense_spec("official", 0.1)
    assert (small["isolation_epochs"], small["recovery_epochs"], small["unlearning_epochs"]) == (1, 6, 1)
    assert full_scale.defense_spec("none", 1.0)["milestones"] == [20, 70]


@pytest.mark.slow
def test_four_runs_on_a_cpu_slice(full_scale, cifar10_root, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nkept text\n")
    text = full_scale.main([
        "--root", str(cifar10_root), "--train", "1000", "--test", "500", "--epochs-scale", "0.05",
        "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(REPO / ".cache" / "test-cache"),
        "--write-readme", str(readme), "--jobs", "2", "--threads", "1",
    ])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    # --jobs 2: each run in its own process, the table still in the runs' order
    assert [r.split("|")[1].strip() for r in rows] == ["none", "paper", "official", "default"]
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 4
    for r in rows[1:]:  # CA / ASR after every stage; no unlearning where nothing was isolated
        isolated = int(r.split("|")[4])
        assert "iso " in r and "rec " in r and ("unl " in r) == (isolated > 0), r
    assert [int(r.split("|")[4]) for r in rows[1:3]] == [10, 10], "paper and official: a fixed 1% of 1,000"
    assert "Command: `python benchmarks/full_scale.py --root" in text and "--jobs 2" in text
    body = readme.read_text()
    assert "kept text" in body and full_scale.BEGIN in body and "CPU" in body
    # a second run replaces the table instead of appending another
    full_scale.write_readme(readme, "new table\n")
    assert readme.read_text().count(full_scale.BEGIN) == 1 and "new table" in readme.read_text()

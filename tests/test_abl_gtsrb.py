"""The default ABL on a real GTSRB slice (../shared/data): another dataset, corner and rate.

3,000 training / 1,000 test images of GTSRB (43 classes, 32x32), BadNets with the grid in
the top-left corner, 5% poisoning, target 1 (the paper's GTSRB target). Default ABL with
the shortened slice schedule, nothing else set, against no defense of the same length.
"""

from __future__ import annotations

import pytest

from abl.experiment import build_experiment, run_experiment
from abl.store import RunStore
from slice_schedule import ABL_DEFAULT_SLICE, NONE_SAME_LENGTH, SLICE_TRAIN

# Known to fail with today's default (2026-11-26): isolation precision 0% (separation 4.6,
# flagged weak), ASR 99.2% -> 68.4%, CA 92.8% -> 80.2% (benchmarks/README.md); the paper
# isolates GTSRB at lr 0.01, the default uses 0.1. It states the target; it runs with
# -m extended until the default meets it, instead of failing every CI run.
pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.xdist_group("gtsrb")]

ATTACK = {"name": "badnets", "rate": 0.05, "target": 1, "position": "top_left"}


@pytest.fixture(scope="module")
def gtsrb_runs(gtsrb_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gtsrb-abl")
    store = RunStore(out / "runs")
    records = {}
    for name, defense in (("none", NONE_SAME_LENGTH), ("abl", ABL_DEFAULT_SLICE)):
        raw = {
            "name": f"gtsrb-slice-{name}",
            "seed": 0,
            "dataset": {"name": "gtsrb", "root": str(gtsrb_root)},
            "model": {"name": "wrn", "depth": 16, "widen": 1},
            "attack": ATTACK,
            "defense": defense,
            "slice": {"train": 3000, "test": 1000, "seed": 0},
            "train": SLICE_TRAIN,
            "output": {"runs_dir": str(out / "runs"), "cache_dir": str(gtsrb_root.parent.parent / "test-cache"), "save_model": False},
        }
        records[name] = run_experiment(build_experiment(raw), store)
    return records


def test_gtsrb_backdoor_learned_then_removed_by_the_default(gtsrb_runs):
    none, abl = gtsrb_runs["none"].final_metrics, gtsrb_runs["abl"].final_metrics
    print(f"GTSRB slice: none CA {none['clean_acc']:.3f} ASR {none['asr']:.3f}; default ABL CA {abl['clean_acc']:.3f} "
          f"ASR {abl['asr']:.3f}, isolation precision {abl['iso_precision']:.3f}, separation {abl['iso_separation']:.1f}")
    assert none["asr"] >= 0.90, none
    assert abl["iso_precision"] >= 0.90, abl
    assert abl["asr"] < 0.10, abl
    assert abl["clean_acc"] >= none["clean_acc"] - 0.05, (none, abl)

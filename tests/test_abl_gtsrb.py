"""The default ABL on a real GTSRB slice (../shared/data): another dataset, corner and rate.

3,000 training / 1,000 test images of GTSRB (43 classes, 32x32), BadNets with the grid in
the top-left corner, 5% poisoning, target 1 (the paper's GTSRB target). Default ABL with
the slice schedule's shortened recovery and unlearning but the default's own isolation
length (20 epochs; the slice schedule shortened it to 12 until 2026-12-06, and now keeps
20 too), nothing else set, against no defense of the same length.

Why the isolation is not shortened here: on this slice the backdoor is learned only at
isolation epoch 12 (ASR 21% at epoch 9, 91% at 12), and the default ranks by the mean log
training loss over the second half of isolation. With 12 epochs that half is mostly
epochs before the backdoor, and the run isolated 0% (30 clean images of label 12); with
the default's 20 epochs the same rule isolated 30 of 30 poisons (separation 5.2)
(``benchmarks/isolation_study.py --dataset gtsrb --train 3000 --epochs 20``,
benchmarks/README.md).

With the default since 2026-12-07 (the count read from the scores, GTSRB's own augmentation
without flips) this test measured: no defense CA 93.3% / ASR 98.7%; default ABL 93.4% /
0.0%, 56 isolated at 98.2% precision (55 of the 150 poisons), on 2026-12-07 (AMD EPYC, one
thread per worker). CA within 2 points of no defense is issue 25's bar for a learned backdoor.
"""

from __future__ import annotations

import pytest

from abl.experiment import build_experiment, run_experiment
from abl.store import RunStore
from slice_schedule import ABL_DEFAULT_SLICE as ABL
from slice_schedule import ISOLATION, SLICE_TRAIN
from slice_schedule import NONE_SAME_LENGTH as NONE

# About 20 minutes on two CPU threads, beyond CI's budget: run with -m extended (README).
pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.xdist_group("gtsrb")]

ATTACK = {"name": "badnets", "rate": 0.05, "target": 1, "position": "top_left"}


@pytest.fixture(scope="module")
def gtsrb_runs(gtsrb_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gtsrb-abl")
    store = RunStore(out / "runs")
    records = {}
    for name, defense in (("none", NONE), ("abl", ABL)):
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
    assert gtsrb_runs["abl"].config["defense"]["isolation_epochs"] == ISOLATION == 20
    print(f"GTSRB slice: none CA {none['clean_acc']:.3f} ASR {none['asr']:.3f}; default ABL CA {abl['clean_acc']:.3f} "
          f"ASR {abl['asr']:.3f}, isolation precision {abl['iso_precision']:.3f}, separation {abl['iso_separation']:.1f}")
    assert none["asr"] >= 0.90, none
    assert abl["iso_precision"] >= 0.90, abl
    assert abl["asr"] < 0.10, abl
    assert abl["clean_acc"] >= none["clean_acc"] - 0.02, (none, abl)

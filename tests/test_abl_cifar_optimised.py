"""The default ABL against the optimisation attacks on the real CIFAR-10 slice.

TrojanNN, CL and Dynamic at 10%, target 0, WRN-16-1, their triggers, poisons and
generators fitted in-project (issue 3). ABL runs with its default preset and the shared
slice schedule (``slice_schedule.py``). No separate no-defense run: the isolation stage
trains on the poisoned set with the batch-mean LGA, and its ASR shows the backdoor was
planted before ABL removed it (the attacks' own tests and benchmarks/README.md show each
attack without defense).
"""

from __future__ import annotations

import pytest

from abl.experiment import build_experiment, run_experiment
from abl.store import RunStore
from slice_schedule import ABL_DEFAULT_SLICE, SLICE_TRAIN

# ~50 minutes of training on two cores (surrogates, generators, three ABL runs): outside
# CI's budget, run with `python -m pytest -m extended` (README, "Run the tests")
pytestmark = [pytest.mark.slow, pytest.mark.extended]

ATTACK_SPECS = {
    "trojannn": {"name": "trojannn", "rate": 0.1, "target": 0, "surrogate_epochs": 10},
    # Clean-label: every target-class image of the slice (rate 1.0 of the target class; the
    # seeded slice holds about 500, not exactly 500, so a rate of the dataset can ask for more
    # than exist) gets PGD
    # (16/255) against the same clean surrogate as TrojanNN (trained once), then the grid in
    # four corners; with one corner the slice learns it at 0.2% ASR only (benchmarks/README.md).
    "cl": {"name": "cl", "rate": 1.0, "rate_of": "target_class", "target": 0, "surrogate_epochs": 10, "corners": 4},
    # Input-aware triggers from generators trained here (narrower and shorter than the
    # authors' 32-wide, 25 + 600 epochs, to fit the CPU); the victim trains from scratch.
    "dynamic": {
        "name": "dynamic", "rate": 0.1, "target": 0, "surrogate_model": "wrn", "surrogate_epochs": 20,
        "surrogate_lr": 0.05, "mask_epochs": 5, "generator_width": 16,
    },
}


# xdist groups: TrojanNN and CL share one clean surrogate (cached per worker), so they run
# on one worker; Dynamic on whichever is free
GROUPS = {"trojannn": "cifar-opt-surrogate", "cl": "cifar-opt-surrogate", "dynamic": "cifar-opt-dynamic"}


@pytest.fixture(scope="module", params=[pytest.param(a, marks=pytest.mark.xdist_group(GROUPS[a])) for a in sorted(ATTACK_SPECS)])
def abl_run(request, cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cifar-opt-{request.param}")
    raw = {
        "name": f"cifar-slice-{request.param}-abl",
        "seed": 0,
        "dataset": {"name": "cifar10", "root": str(cifar10_root)},
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": ATTACK_SPECS[request.param],
        "defense": ABL_DEFAULT_SLICE,
        "slice": {"train": 5000, "test": 2000, "seed": 0},
        "train": SLICE_TRAIN,
        "output": {"runs_dir": str(out / "runs"), "cache_dir": str(cifar10_root.parent.parent / "test-cache"), "save_model": False},
    }
    rec = run_experiment(build_experiment(raw), RunStore(out / "runs"))
    m = rec.metrics
    print(f"\n{request.param}: after isolation CA {m['isolation']['clean_acc']:.3f} ASR {m['isolation']['asr']:.3f}; "
          f"final CA {m['final']['clean_acc']:.3f} ASR {m['final']['asr']:.3f}, precision "
          f"{m['final']['iso_precision']:.3f}, separation {m['final']['iso_separation']:.1f}")
    return rec


def test_backdoor_planted_then_removed_by_the_default(abl_run):
    m = abl_run.metrics
    assert abl_run.status == "finished"
    assert m["isolation"]["asr"] >= 0.80, m["isolation"]
    assert m["final"]["iso_precision"] >= 0.90, m["final"]
    assert m["final"]["asr"] < 0.10, m["final"]
    assert m["final"]["clean_acc"] >= m["recovery"]["clean_acc"] - 0.05, m

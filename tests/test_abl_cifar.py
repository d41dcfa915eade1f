"""ABL end to end on a real CIFAR-10 slice (5,000 training images from ../shared/data).

BadNets, TrojanNN, CL and Dynamic at 10%, target 0, WRN-16-1 (the paper's model).
Schedules are shortened to fit two CPU cores; the thresholds are the ones the project commits to: without defense the
backdoor is learned (ASR >= 90%); with ABL the isolated 1% is >= 90% poisoned and the
ASR falls below 10%. On a 5,000-image slice the backdoor is only learned around epoch 8,
and a single-epoch ranking is at the mercy of the model's swinging class bias, so the
ranking is averaged over the last 3 isolation epochs (``rank_epochs``).
"""

from __future__ import annotations

import math

import pytest

from abl.experiment import build_experiment, run_experiment
from abl.report import write_report
from abl.store import RunStore

pytestmark = pytest.mark.slow

BASE = {
    "seed": 0,
    "model": {"name": "wrn", "depth": 16, "widen": 1},
    "slice": {"train": 5000, "test": 2000, "seed": 0},
    "train": {"batch_size": 32, "eval_every": 4, "eval_subset": 1000, "progress": False},
}

NO_DEFENSE = {"name": "none", "epochs": 12, "lr": 0.05, "milestones": [10]}

ABL_SHORT = {
    "name": "abl",
    "preset": "paper",
    "isolation_loss": "lga_batch",
    "isolation_epochs": 12,
    "isolation_lr": 0.05,
    "rank_epochs": 3,
    "recovery_epochs": 4,
    "recovery_lr": 0.05,
    "recovery_milestones": [3],
    "unlearning_epochs": 20,
    "unlearning_lr": 0.001,
}


# BadNets with the authors' grid; TrojanNN with a trigger generated in-project against a
# clean WRN-16-1 surrogate (issue 3).
ATTACK_SPECS = {
    "badnets": {"name": "badnets", "rate": 0.1, "target": 0},
    "trojannn": {"name": "trojannn", "rate": 0.1, "target": 0, "surrogate_epochs": 10},
    # Clean-label: all 500 target-class images of the slice get PGD (16/255) against the
    # same clean surrogate as TrojanNN (trained once), then the grid in four corners; with
    # one corner the slice learns it at 0.2% ASR only (benchmarks/README.md).
    "cl": {"name": "cl", "rate": 0.1, "target": 0, "surrogate_epochs": 10, "corners": 4},
    # Input-aware triggers from generators trained here (narrower and shorter than the
    # authors' 32-wide, 25 + 600 epochs, to fit the CPU); the victim trains from scratch.
    "dynamic": {
        "name": "dynamic",
        "rate": 0.1,
        "target": 0,
        "surrogate_model": "wrn",
        "surrogate_epochs": 20,
        "surrogate_lr": 0.05,
        "mask_epochs": 5,
        "generator_width": 16,
    },
}


@pytest.fixture(scope="module", params=sorted(ATTACK_SPECS))
def cifar_runs(request, cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cifar-abl-{request.param}")
    store = RunStore(out / "runs")
    records = {}
    for name, defense in (("none", NO_DEFENSE), ("abl", ABL_SHORT)):
        raw = {
            **BASE,
            "attack": ATTACK_SPECS[request.param],
            "name": f"cifar-slice-{request.param}-{name}",
            "dataset": {"name": "cifar10", "root": str(cifar10_root)},
            "defense": defense,
            "output": {"runs_dir": str(out / "runs"), "cache_dir": str(cifar10_root.parent.parent / "test-cache"), "save_model": False},
        }
        records[name] = run_experiment(build_experiment(raw), store)
    return store, records, out


def test_backdoor_is_learned_without_defense(cifar_runs):
    _, records, _ = cifar_runs
    final = records["none"].final_metrics
    assert records["none"].status == "finished"
    assert final["asr"] >= 0.90, final
    assert final["clean_acc"] > 0.35, final


def test_abl_isolates_poison_and_removes_backdoor(cifar_runs):
    _, records, _ = cifar_runs
    rec = records["abl"]
    final = rec.final_metrics
    assert rec.status == "finished"
    assert final["iso_count"] == 50
    assert final["iso_precision"] >= 0.90, final
    assert final["asr"] < 0.10, final
    assert final["clean_acc"] > 0.35, final
    iso = rec.array("isolated_indices")
    mask = rec.array("poison_mask")
    assert math.isclose(mask[iso].mean(), final["iso_precision"])


def test_backdoor_examples_are_learned_faster(cifar_runs):
    """The paper's Figure 6, from the per-example losses recorded during training."""
    _, records, _ = cifar_runs
    losses = records["none"].array("example_losses")
    mask = records["none"].array("poison_mask")
    last = losses[-1]
    assert last[mask].mean() < 0.5 * last[~mask].mean()


def test_report_from_the_store(cifar_runs):
    store, records, out = cifar_runs
    path = write_report(store, [r.run_id for r in records.values()], out / "report")
    text = path.read_text()
    for rec in records.values():
        assert rec.run_id in text
    assert len(list((out / "report").glob("*.png"))) >= 5

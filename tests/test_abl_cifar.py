"""The default ABL end to end on a real CIFAR-10 slice (5,000 training images, ../shared/data).

BadNets, Blend and Trojan at 10%, target 0, WRN-16-1 (the paper's model and attacks).
ABL runs with its default preset, only the epoch counts shortened (``slice_schedule.py``);
the no-defense baseline trains as many epochs. What the project commits to: without
defense the backdoor is learned (ASR >= 90%); the default decides from the scores how many
to isolate and isolates at least 90% of the poisons with precision >= 90%, takes the ASR
to 5% or below (issue 25's criterion) and costs at most 2 points of clean accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from abl.experiment import build_experiment, run_experiment
from abl.report import write_report
from abl.store import RunStore
from slice_schedule import ABL_DEFAULT_SLICE, NONE_SAME_LENGTH, SLICE_TRAIN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "seed": 0,
    "model": {"name": "wrn", "depth": 16, "widen": 1},
    "slice": {"train": 5000, "test": 2000, "seed": 0},
    "train": SLICE_TRAIN,
}

ATTACK_SPECS = {
    "badnets": {"name": "badnets", "rate": 0.1, "target": 0},
    "blend": {"name": "blend", "rate": 0.1, "target": 0, "alpha": 0.2},
    # the Trojan trigger shipped with the authors' code (a 3x3 patch, added)
    "trojan": {
        "name": "trojan", "rate": 0.1, "target": 0,
        "trigger_file": str(REPO.parent / "shared" / "data" / "triggers" / "abl-official-trojan-cifar10.npz"),
    },
}


# one xdist group per attack: its module-scoped runs train once, the attacks in parallel
@pytest.fixture(scope="module", params=[pytest.param(a, marks=pytest.mark.xdist_group(f"cifar-{a}")) for a in sorted(ATTACK_SPECS)])
def cifar_runs(request, cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cifar-abl-{request.param}")
    store = RunStore(out / "runs")
    records = {}
    for name, defense in (("none", NONE_SAME_LENGTH), ("abl", ABL_DEFAULT_SLICE)):
        raw = {
            **BASE,
            "attack": ATTACK_SPECS[request.param],
            "name": f"cifar-slice-{request.param}-{name}",
            "dataset": {"name": "cifar10", "root": str(cifar10_root)},
            "defense": defense,
            "output": {"runs_dir": str(out / "runs"), "cache_dir": str(cifar10_root.parent.parent / "test-cache"), "save_model": False},
        }
        records[name] = run_experiment(build_experiment(raw), store)
    none, abl = records["none"].final_metrics, records["abl"].final_metrics
    stages = {p: (round(m.get("clean_acc", float("nan")), 3), round(m.get("asr", float("nan")), 3))
              for p, m in records["abl"].metrics.items() if p in ("isolation", "recovery", "unlearning")}
    print(f"\n{request.param}: none CA {none['clean_acc']:.3f} ASR {none['asr']:.3f} | default ABL CA "
          f"{abl['clean_acc']:.3f} ASR {abl['asr']:.3f} precision {abl['iso_precision']:.3f} separation "
          f"{abl['iso_separation']:.1f} | CA/ASR by stage {stages}")
    return store, records, out


def test_backdoor_is_learned_without_defense(cifar_runs):
    _, records, _ = cifar_runs
    final = records["none"].final_metrics
    assert records["none"].status == "finished"
    assert final["asr"] >= 0.90, final
    assert final["clean_acc"] > 0.45, final


def test_default_abl_isolates_poison_and_removes_backdoor(cifar_runs):
    _, records, _ = cifar_runs
    rec = records["abl"]
    final, none = rec.final_metrics, records["none"].final_metrics
    assert rec.status == "finished"
    assert rec.config["defense"]["preset"] == "default"
    assert rec.config["defense"]["isolation_count"] == "auto"
    # BadNets: 515 isolated, 494 of the 500 poisons (benchmarks/README.md, the threat matrix)
    assert final["iso_recall"] >= 0.90 and final["iso_precision"] >= 0.90, final
    assert final["iso_evidence"] == 1.0, final
    assert final["asr"] <= 0.05, final
    assert final["clean_acc"] >= none["clean_acc"] - 0.02, (none, final)
    assert final["iso_weak"] == 0.0, final
    iso = rec.array("isolated_indices")
    mask = rec.array("poison_mask")
    assert math.isclose(mask[iso].mean(), final["iso_precision"])


def test_every_stage_is_measured(cifar_runs):
    """CA/ASR after each stage, and the backdoor present before unlearning: the final ASR
    is the unlearning's doing, not an attack that never took. (After 20 isolation epochs
    held at the LGA threshold, BadNets' ASR was 78-100%: learned, which is what the ranking
    needs. Recovery on D_c, without the isolated poisons, brings it down to about 10%, where
    the fixed 1%, leaving 90% of the poisons in D_c, brought it back to 100%.)"""
    _, records, _ = cifar_runs
    m = records["abl"].metrics
    assert m["isolation"]["asr"] >= 0.50, m["isolation"]
    assert m["recovery"]["asr"] < m["isolation"]["asr"], m
    assert all(m[p]["stage_s"] > 0 for p in ("isolation", "recovery", "unlearning"))
    assert m["unlearning"]["asr"] < m["recovery"]["asr"], m


def test_backdoor_examples_are_learned_faster(cifar_runs):
    """The paper's Figure 6, from the per-example losses recorded during training: the
    poisons' mean training loss falls below 0.1 at least 5 epochs before the clean
    examples' does. (Measured without defense, 31 epochs: BadNets at epoch 11 against 24,
    Blend 7 against 23, Trojan 14 against 23. A fixed epoch is no test: BadNets' poisons sat
    above the clean examples until epoch 9 on one CPU, and by the last epoch both are
    fitted.)"""
    _, records, _ = cifar_runs
    losses = records["none"].array("example_losses")
    mask = records["none"].array("poison_mask")

    def fitted_at(sel: np.ndarray) -> int:
        below = np.flatnonzero(np.nanmean(losses[:, sel], axis=1) < 0.1)
        return int(below[0]) + 1 if len(below) else len(losses) + 1

    poison, clean = fitted_at(mask), fitted_at(~mask)
    assert poison + 5 <= clean, f"poisons fitted at epoch {poison}, clean examples at {clean}"


def test_report_from_the_store(cifar_runs):
    store, records, out = cifar_runs
    path = write_report(store, [r.run_id for r in records.values()], out / "report")
    text = path.read_text()
    for rec in records.values():
        assert rec.run_id in text
    assert len(list((out / "report").glob("*.png"))) >= 5

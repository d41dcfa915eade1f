"""The clean-model control (issue 24, item 3): with ``attack.control: true`` a run also
trains a model on its clean training set (no poison, the same model, initial weights,
schedule and data order) and records the ASR of its attack's trigger on it beside the
ASR; the model is a stage shared by every attack and rate of one data/model/schedule."""

from __future__ import annotations

import json

import pytest

from abl.experiment import build_experiment, control_schedule, run_experiment
from abl.report import terminal_table, write_report
from abl.stages import BackdoorSchedule
from abl.store import RunStore

SCHEDULE = {"epochs": 4, "lr": 0.1, "milestones": [3]}


def _config(tmp_path, attack, defense=None):
    return {
        "name": "control",
        "dataset": {"name": "digits"},
        "model": {"name": "small_cnn", "width": 8},
        "attack": attack,
        "defense": defense or {"name": "none", **SCHEDULE},
        "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1},
        "output": {"cache_dir": str(tmp_path / "cache")},
    }


def test_the_control_is_a_clean_training_shared_by_attacks_and_rates_and_reported(tmp_path):
    store = RunStore(tmp_path / "runs")
    badnets = run_experiment(build_experiment(_config(
        tmp_path, {"name": "badnets", "rate": 0.1, "target": 0, "size": 3, "control": True})), store)
    blend = run_experiment(build_experiment(_config(
        tmp_path, {"name": "blend", "rate": 0.05, "target": 0, "control": True})), store)
    # the same data/model/schedule without any attack: what the control model must be
    clean = run_experiment(build_experiment(_config(tmp_path, None)), store)

    stages = [json.loads((r.path / "stages.json").read_text())["control"] for r in (badnets, blend)]
    assert stages[0]["hit"] is False and stages[1]["hit"] is True and stages[0]["key"] == stages[1]["key"]
    for rec in (badnets, blend):
        control = rec.metrics["control"]
        assert control["clean_acc"] == pytest.approx(clean.final_metrics["clean_acc"], abs=1e-6)
        assert rec.final_metrics["control_asr"] == control["asr"]
    # the backdoor is learned by the poisoned model, not by the clean one
    assert badnets.final_metrics["asr"] > 0.9 and badnets.final_metrics["control_asr"] < 0.5
    assert badnets.final_metrics["control_asr"] != blend.final_metrics["control_asr"]  # each its own trigger

    wide = terminal_table([badnets], wide=True)
    assert "ASR clean model" in wide.splitlines()[0]
    assert f"{100 * badnets.final_metrics['control_asr']:.2f}%" in wide
    md = write_report(store, [badnets.run_id], tmp_path / "report").read_text()
    assert "| ASR (clean model) |" in md


def test_the_control_is_off_by_default_and_follows_the_defenses_schedule(tmp_path):
    rec = run_experiment(build_experiment(_config(tmp_path, {"name": "badnets", "rate": 0.1, "target": 0})),
                         RunStore(tmp_path / "runs"))
    assert "control" not in rec.metrics and "control_asr" not in rec.final_metrics
    assert not (rec.path / "stages.json").exists()
    none = build_experiment(_config(tmp_path, None)).defense
    assert control_schedule(none) == BackdoorSchedule(epochs=4, lr=0.1, milestones=[3], lr_factor=0.1, augment=False)
    abl = build_experiment(_config(tmp_path, None, {"name": "abl", "backdoor": {"epochs": 7, "milestones": [5]}})).defense
    assert control_schedule(abl) == BackdoorSchedule(epochs=7, milestones=[5])

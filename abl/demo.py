"""``abl demo``: BadNets on scikit-learn's bundled digits, without defense and with ABL.

Runs on a fresh machine with no downloads: the digits (1,797 real 8x8 scans, upscaled
to 16x16) ship with scikit-learn.
"""

from __future__ import annotations

import copy
from pathlib import Path

from abl.experiment import load_experiment, run_experiment
from abl.report import runs_table, write_report
from abl.store import RunRecord, RunStore

DEMO_BASE: dict = {
    "seed": 0,
    "dataset": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 16},
    "attack": {"name": "badnets", "rate": 0.1, "target": 0},
    "train": {"batch_size": 64, "eval_subset": 0, "progress": False},
}

# The default ABL with its recovery shortened for 1,347 small images (isolation and
# unlearning keep the default's 20 epochs; unlearning stops early on its own); nothing else
# is set. The baseline trains as many epochs (20 + 10 + 20), its lr divided by 10 at 70%.
DEMO_DEFENSES: dict[str, dict] = {
    "demo-none": {"name": "none", "epochs": 50, "lr": 0.1, "milestones": [35]},
    "demo-abl": {
        "name": "abl",
        "isolation_epochs": 20,
        "recovery_epochs": 10,
        "recovery_milestones": [7],
        "unlearning_epochs": 20,
    },
}


def run_demo(out_dir: str | Path = "abl-demo", overrides: list[str] | None = None) -> tuple[list[RunRecord], Path]:
    """Run both demo experiments into ``out_dir/runs`` and write ``out_dir/report.md``."""
    out = Path(out_dir)
    store = RunStore(out / "runs")
    records = []
    for name, defense in DEMO_DEFENSES.items():
        base = copy.deepcopy(DEMO_BASE)
        base["name"] = name
        base["defense"] = copy.deepcopy(defense)
        exp = load_experiment(None, overrides, base=base)
        records.append(run_experiment(exp, store))
    report = write_report(store, [r.run_id for r in records], out, title="abl demo: BadNets on digits")
    return records, report


def demo_table(records: list[RunRecord]) -> str:
    return runs_table(records)

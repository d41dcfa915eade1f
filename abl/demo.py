"""``abl demo``: BadNets on scikit-learn's bundled digits, without defense and with ABL.

Runs on a fresh machine with no downloads: the digits (1,797 real 8x8 scans, upscaled
to 16x16) ship with scikit-learn.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from pathlib import Path

from abl.errors import ConfigError
from abl.experiment import load_experiment, run_experiment
from abl.report import terminal_table, write_report
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


def demo_overrides(overrides: list[str] | None) -> dict[str, list[str]]:
    """Each demo run's share of ``overrides``: a ``defense.KEY=...`` goes to the runs whose
    defense has ``KEY`` (``--set defense.isolation_count=auto`` is ABL's, and the no-defense
    run would refuse it), every other key to both; a defense key neither has is a ConfigError."""
    from abl.defenses import DEFENSES

    fields = {name: {f.name for f in dataclasses.fields(DEFENSES.get(d["name"]))} for name, d in DEMO_DEFENSES.items()}
    shares: dict[str, list[str]] = {name: [] for name in DEMO_DEFENSES}
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if parts[0] != "defense" or len(parts) < 2:
            for share in shares.values():
                share.append(item)
            continue
        takers = [name for name in DEMO_DEFENSES if parts[1] in fields[name]]
        if not takers:
            known = sorted(set().union(*fields.values()))
            raise ConfigError(f"unknown key '{key}' for the demo's defenses "
                              f"({', '.join(d['name'] for d in DEMO_DEFENSES.values())}); valid keys: {', '.join(known)}")
        for name in takers:
            shares[name].append(item)
    return shares


def run_demo(out_dir: str | Path = "abl-demo", overrides: list[str] | None = None) -> tuple[list[RunRecord], Path]:
    """Run both demo experiments into ``out_dir/runs`` and write ``out_dir/report.md``.

    Both are built and validated before either trains, so a bad override stops the demo
    before it writes anything."""
    out = Path(out_dir)
    shares = demo_overrides(overrides)
    exps = []
    for name, defense in DEMO_DEFENSES.items():
        base = copy.deepcopy(DEMO_BASE)
        base["name"] = name
        base["defense"] = copy.deepcopy(defense)
        exps.append(load_experiment(None, shares[name], base=base))
    store = RunStore(out / "runs")
    records = []
    for exp in exps:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = run_experiment(exp, store)
        records.append(record)
        _pass_on(caught, record)
    report = write_report(store, [r.run_id for r in records], out, title="abl demo: BadNets on digits")
    return records, report


def _pass_on(caught: list[warnings.WarningMessage], record: RunRecord) -> None:
    """Show the run's warnings, but the one the demo's size makes inevitable as a note: 1% of
    1,347 digits is 13 isolated examples, a fifth of them held out is under the 10 that the
    held-out check of unlearning needs to be firm, and a demo user can change neither."""
    for w in caught:
        if "held-out check of unlearning rests on" in str(w.message):
            held = record.metrics.get("unlearning", {}).get("iso_heldout_count")
            count = f"{held:.0f} of its" if isinstance(held, float) else "a few"
            logging.getLogger(__name__).info(
                "note: the demo's training set is small, so the check that unlearning cut the backdoor rests on "
                "%s isolated examples; on a full dataset (1%% of 50,000 images isolated) it rests on 100", count)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def demo_table(records: list[RunRecord]) -> str:
    """The demo's runs as the terminal table (within 100 columns)."""
    return terminal_table(records)

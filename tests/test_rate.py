"""One meaning of ``attack.rate`` (issue 24, item 2): the share of the whole training set,
for every attack; ``rate_of: target_class`` keeps the clean-label attacks' earlier meaning,
and every run records how many examples it poisoned."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from abl.attacks import ATTACKS
from abl.errors import ConfigError
from abl.experiment import build_experiment, run_experiment
from abl.report import terminal_table
from abl.store import RunStore
from abl.sweep import load_grid

BASE = {
    "name": "rate",
    "dataset": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 4},
    "attack": {"name": "badnets", "rate": 0.05, "target": 0},
    "defense": {"name": "none", "epochs": 1, "milestones": []},
    "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1},
}


def test_a_grid_over_badnets_and_sig_at_one_rate_poisons_the_same_number_in_both_cells(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "rates", "base": BASE, "axes": {"attack": ["badnets", "sig"]}}))
    cells = load_grid(grid_file).cells(threads=1)
    assert [c.raw["attack"]["name"] for c in cells] == ["badnets", "sig"]
    store = RunStore(tmp_path / "runs")
    counts = {}
    for cell in cells:
        exp = build_experiment(copy.deepcopy(cell.raw))
        assert exp.resolved()["attack"]["rate_of"] == "dataset"  # recorded explicitly with every new run
        rec = run_experiment(exp, store)
        mask = rec.array("poison_mask")
        counts[cell.raw["attack"]["name"]] = (int(rec.metrics["attack"]["n_poison"]), int(mask.sum()), len(mask))
    (badnets, badnets_mask, n), (sig, sig_mask, _) = counts["badnets"], counts["sig"]
    assert badnets == sig == badnets_mask == sig_mask == round(0.05 * n)  # 5% of the set in both cells
    wide = terminal_table(store.list_runs(), wide=True)
    assert "poisons" in wide.splitlines()[0] and wide.count(f" {badnets} ") >= 2


def test_a_clean_label_rate_beyond_the_target_class_is_one_line_naming_both_counts():
    labels = torch.arange(600) % 10  # 60 images per class
    attack = ATTACKS.create({"name": "sig", "rate": 0.2, "target": 3})
    with pytest.raises(ConfigError) as info:
        attack.select(labels)
    text = str(info.value)
    assert "\n" not in text and "needs 120 target-class images" in text and "class 3 holds 60" in text
    assert "rate_of: target_class" in text and "lower attack.rate" in text


@pytest.mark.parametrize("name", ["sig", "cl", "fc", "sleeper_agent"])
def test_rate_of_target_class_keeps_the_earlier_count_of_each_clean_label_attack(name):
    labels = torch.arange(600) % 10
    old = ATTACKS.create({"name": name, "rate": 0.5, "target": 2, "rate_of": "target_class"})
    assert int(old.select(labels).sum()) == 30  # half of class 2
    new = ATTACKS.create({"name": name, "rate": 0.05, "target": 2})
    assert int(new.select(labels).sum()) == 30  # 5% of 600, all from class 2
    assert bool((labels[new.select(labels)] == 2).all())


def test_a_stored_config_keeps_the_meaning_it_was_made_with():
    """Runs stored since rate_of exists (2026-11-26) record it, so they rebuild with it;
    a stored config without it predates it and meant a share of the set, the default."""
    recorded = build_experiment({**BASE, "attack": {"name": "sig", "rate": 0.1, "target": 0, "rate_of": "target_class"}})
    assert recorded.attack.rate_of == "target_class"
    again = build_experiment(recorded.resolved())  # what `abl resume` does with config.yaml
    assert again.attack.rate_of == "target_class" and again.resolved() == recorded.resolved()
    before = build_experiment({**BASE, "attack": {"name": "sig", "rate": 0.1, "target": 0}})
    assert before.attack.rate_of == "dataset"

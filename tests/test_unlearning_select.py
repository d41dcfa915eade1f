"""Which unlearning epoch GGA keeps (``select: heldout``): the suspects' fit, gated by the
clean fit on ``D_c`` (issue 25, item 2). The rule is a pure function, tested on records;
one digits run checks it end to end against the old suspects-only rule."""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.defenses import DEFENSES
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.models import MODELS
from abl.unlearning import UNLEARNERS
from abl.unlearning.gga import MIN_FIRM_HOLDOUT, EpochFit, clean_sample, select_epoch, suspect_fit

FIRM = dict(n_held=20, n_unlearned=80)  # enough held-out suspects to judge alone


def rec(clean: float, held: float, loss: float = 1.0, unlearned: float = 0.0) -> EpochFit:
    return EpochFit(clean_fit=clean, held_fit=held, held_loss=loss, unlearned_fit=unlearned)


def test_eligible_epoch_fitting_the_suspects_least_is_kept():
    records = [rec(0.95, 0.6), rec(0.94, 0.1), rec(0.96, 0.3)]
    assert select_epoch(records, clean_before=0.95, tolerance=0.02, **FIRM) == 1


def test_an_epoch_that_lost_clean_fit_is_not_eligible_however_well_it_cut():
    # epoch 1 cut every suspect but fell 5 points of clean fit: the damaged model
    records = [rec(0.95, 0.4, loss=1.0), rec(0.90, 0.0, loss=4.0), rec(0.94, 0.2, loss=2.0)]
    assert select_epoch(records, clean_before=0.95, tolerance=0.02, **FIRM) == 2
    # a wider tolerance admits it
    assert select_epoch(records, clean_before=0.95, tolerance=0.06, **FIRM) == 1
    # at the floor is eligible
    assert select_epoch([rec(0.95, 0.5), rec(0.93, 0.0)], clean_before=0.95, tolerance=0.02, **FIRM) == 1


def test_with_no_eligible_epoch_the_least_damaged_is_kept():
    records = [rec(0.50, 0.0, loss=10.0), rec(0.88, 0.7), rec(0.11, 0.0, loss=10.0), rec(0.80, 0.0)]
    assert select_epoch(records, clean_before=0.95, tolerance=0.02, **FIRM) == 1
    # among equally damaged ones: fewer suspects fitted
    assert select_epoch([rec(0.8, 0.5), rec(0.8, 0.2)], clean_before=0.95, tolerance=0.02, **FIRM) == 1


def test_ties_never_go_to_the_lower_clean_fit():
    # same suspect fit and loss: the higher clean fit, whichever comes first
    assert select_epoch([rec(0.94, 0.0, 3.0), rec(0.96, 0.0, 3.0)], clean_before=0.95, tolerance=0.02, **FIRM) == 1
    assert select_epoch([rec(0.96, 0.0, 3.0), rec(0.94, 0.0, 3.0)], clean_before=0.95, tolerance=0.02, **FIRM) == 0
    # equal in everything: the earlier epoch
    assert select_epoch([rec(0.95, 0.0, 3.0), rec(0.95, 0.0, 3.0)], clean_before=0.95, tolerance=0.02, **FIRM) == 0


def test_equal_suspect_fit_goes_to_the_higher_suspect_loss_among_undamaged_epochs():
    # the relapse: clean fit rises as the backdoor creeps back; the held-out loss sees it
    records = [rec(0.940, 0.0, loss=3.5), rec(0.960, 0.0, loss=2.6), rec(0.965, 0.0, loss=1.9)]
    assert select_epoch(records, clean_before=0.95, tolerance=0.02, **FIRM) == 0


def test_few_held_out_suspects_do_not_decide_alone():
    # epoch 0: the 3 held-out suspects read unfitted, but 7 of the 10 unlearned still fit;
    # epoch 1: one held-out suspect fits, none of the unlearned
    records = [rec(0.95, 0.0, loss=3.0, unlearned=0.7), rec(0.95, 1 / 3, loss=2.0, unlearned=0.0)]
    assert select_epoch(records, clean_before=0.95, tolerance=0.02, n_held=3, n_unlearned=10) == 1
    assert suspect_fit(records[0], 3, 10) == pytest.approx(7 / 13)
    # with a firm number held out, they decide
    n = MIN_FIRM_HOLDOUT
    assert select_epoch(records, clean_before=0.95, tolerance=0.02, n_held=n, n_unlearned=4 * n) == 0
    assert suspect_fit(records[0], n, 4 * n) == 0.0


def test_a_choice_on_a_prefix_moves_only_to_the_newest_epoch():
    """What patience relies on: the kept epoch on epochs 0..e is the one on 0..e-1 or e."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 12, (1,), generator=g))
        vals = torch.rand(n, 4, generator=g)
        records = [rec(0.9 + 0.1 * float(v[0]), round(float(v[1]) * 3) / 3, float(v[2]) * 4, float(v[3])) for v in vals]
        kept = [select_epoch(records[: e + 1], 0.97, 0.02, n_held=3, n_unlearned=10) for e in range(n)]
        for e in range(1, n):
            assert kept[e] in (kept[e - 1], e)


def test_no_records_and_bad_tolerance_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        select_epoch([], 0.9, 0.02, **FIRM)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="unlearner.clean_tolerance"):
            UNLEARNERS.create({"name": "gga", "clean_tolerance": bad})
    assert UNLEARNERS.create({"name": "gga"}).clean_tolerance == 0.02


def test_clean_sample_is_seeded_and_leaves_out_the_suspects_label():
    labels = torch.arange(100) % 5
    isolated = torch.tensor([0, 5, 10, 15, 1])  # four of five carry label 0
    clean = torch.arange(20, 100)
    sample = clean_sample(clean, labels, isolated, seed=3, n=30)
    assert len(sample) == 30 and bool((labels[sample] != 0).all())
    assert set(sample.tolist()) <= set(clean.tolist())
    assert torch.equal(sample, clean_sample(clean.flip(0), labels, isolated, seed=3, n=30)), "order-free, seeded"
    assert not torch.equal(sample, clean_sample(clean, labels, isolated, seed=4, n=30))
    # no label carried by most suspects (all-to-all, or clean examples isolated): all labels stay
    spread = clean_sample(clean, labels, torch.tensor([0, 1, 2, 3]), seed=3, n=1000)
    assert torch.equal(spread, clean)


def _digits_engine() -> Engine:
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1, "target": 0})
    attack.setup(splits.image_size, splits.num_classes)
    data = attack.poison(splits.train)
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
    cfg = TrainConfig(progress=False, batch_size=64, eval_every=1, eval_subset=0, threads=1)
    return Engine(model, data, splits.test, attack.triggered_test(splits.test), cfg, seed=0)


def test_digits_unbounded_fast_ascent_keeps_the_undamaged_epoch():
    """The issue's case: unlearning at lr 0.01 with no ceiling collapses the digits model
    within a few epochs, and the held-out suspects, all unfitted by a collapsed model with
    the highest loss, made the old rule keep it. The kept model must not be below the CA of
    the epoch that fits the suspects least, and patience counts from the epoch kept."""
    engine = _digits_engine()
    abl = DEFENSES.create({
        "name": "abl", "isolation_count": "fixed", "isolation_epochs": 8, "recovery_epochs": 4, "recovery_milestones": [3],
        "unlearning_epochs": 6, "unlearning_lr": 0.01, "unlearning_ceiling": float("inf"), "unlearning_patience": 2,
    })
    result = abl.run(engine)
    m = result.metrics["unlearning"]
    rows = [h for h in engine.history if h["phase"] == "unlearning"]
    assert all("clean_fit" in h for h in rows)
    old = min(range(len(rows)), key=lambda i: (rows[i]["heldout_fit"], -rows[i]["heldout_loss"]))
    kept = int(m["unlearn_epoch_kept"]) - 1
    assert len(rows) == m["unlearn_epochs_run"] == kept + 1 + 2 < 6, "stopped 2 epochs after the kept one"
    assert old != kept, "the scenario: the suspects alone would keep another epoch"
    assert m["clean_acc"] == pytest.approx(rows[kept]["clean_acc"]), "the kept epoch's model is the result"
    assert m["clean_acc"] >= rows[old]["clean_acc"] + 0.2, "that epoch's model has collapsed"
    assert m["clean_fit_after"] == pytest.approx(rows[kept]["clean_fit"])
    eligible = [i for i, h in enumerate(rows) if h["clean_fit"] >= m["clean_fit_before"] - 0.02]
    if eligible:
        assert kept in eligible
    else:
        assert rows[kept]["clean_fit"] == max(h["clean_fit"] for h in rows)

"""Contract tests over every registered defense, and ABL's presets and phases."""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.defenses import DEFENSES
from abl.defenses.abl import ABL, PRESETS
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.models import MODELS

# Short settings per defense; a defense registered without an entry here fails the
# contract test below, so every new defense gets the same checks.
SHORT = {
    "none": {"epochs": 3, "lr": 0.05},
    "abl": {
        "isolation_epochs": 2,
        "isolation_lr": 0.02,
        "recovery_epochs": 2,
        "recovery_lr": 0.05,
        "unlearning_epochs": 2,
        "unlearning_lr": 0.001,
    },
}


@pytest.fixture(scope="module")
def digits():
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1})
    attack.setup(splits.image_size, splits.num_classes)
    return splits, attack.poison(splits.train), attack.triggered_test(splits.test)


def engine_for(digits) -> Engine:
    splits, data, trig = digits
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn", "width": 8}).build(10, splits.image_size)
    return Engine(model, data, splits.test, trig, TrainConfig(progress=False, batch_size=128, eval_every=0), seed=0)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_contract(name, digits):
    assert name in SHORT, f"add short settings for defense '{name}' to SHORT"
    defense = DEFENSES.create({"name": name, **SHORT[name]})
    engine = engine_for(digits)
    result = defense.run(engine)
    final = result.metrics["final"]
    assert {"clean_acc", "asr", "robust_acc"} <= set(final)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for k, v in final.items() if k != "iso_count")
    assert len(engine.history) == defense.total_epochs()
    assert engine.loss_matrix().shape == (defense.total_epochs(), len(engine.data))
    if result.isolated is not None:
        assert result.isolated.dtype == torch.long and len(result.isolated) == len(torch.unique(result.isolated))
        assert bool((result.isolated_losses[1:] >= result.isolated_losses[:-1]).all()), "isolated lowest loss first"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_is_deterministic(name, digits):
    runs = []
    for _ in range(2):
        engine = engine_for(digits)
        DEFENSES.create({"name": name, **SHORT[name]}).run(engine)
        runs.append(engine.loss_matrix())
    assert torch.allclose(runs[0], runs[1], equal_nan=True)


def test_abl_phases_and_subsets(digits):
    engine = engine_for(digits)
    defense = DEFENSES.create({"name": "abl", **SHORT["abl"], "isolation_rate": 0.05})
    result = defense.run(engine)
    phases = [h["phase"] for h in engine.history]
    assert phases == ["isolation"] * 2 + ["recovery"] * 2 + ["unlearning"] * 2
    losses = engine.loss_matrix()
    iso = result.isolated
    assert len(iso) == int(len(engine.data) * 0.05)
    # recovery trains on D_c only: isolated examples are never seen there
    assert bool(losses[2:4, iso].isnan().all())
    # GGA: every batch pairs D_b with D_c, so both are trained in unlearning
    assert bool(losses[4:, iso].isfinite().all())
    assert {"isolation", "recovery", "unlearning", "final"} <= set(result.metrics)
    assert 0 <= result.metrics["final"]["iso_precision"] <= 1


def test_abl_full_recovery_and_official_ascent(digits):
    engine = engine_for(digits)
    defense = DEFENSES.create({"name": "abl", "preset": "official", **SHORT["abl"], "recovery_data": "full"})
    result = defense.run(engine)
    losses = engine.loss_matrix()
    assert bool(losses[2:4].isfinite().all()), "recovery on the full set trains every example"
    unlearn = losses[4:]
    seen = unlearn.isfinite().any(0)
    assert set(seen.nonzero().squeeze(1).tolist()) == set(result.isolated.tolist()), "pure ascent visits D_b only"
    assert engine.history[0]["phase"] == "isolation"


def test_presets_are_complete_and_differ():
    paper, official = ABL(preset="paper"), ABL(preset="official")
    paper.validate()
    official.validate()
    for key in PRESETS["paper"]:
        assert getattr(paper, key) is not None and getattr(official, key) is not None
    assert (paper.isolation_epochs, official.isolation_epochs) == (20, 10)
    assert (paper.unlearning, official.unlearning) == ("gga", "ascent")
    assert (paper.unlearning_lr, official.unlearning_lr) == (0.0001, 0.0005)
    assert paper.total_epochs() == 100


def test_explicit_values_win_over_preset():
    d = DEFENSES.create({"name": "abl", "preset": "official", "isolation_epochs": 7, "unlearning_lr": 0.01})
    assert d.isolation_epochs == 7 and d.unlearning_lr == 0.01 and d.isolation_loss == "flooding"


@pytest.mark.parametrize(
    "params, key",
    [({"isolation_lr": 0}, "defense.isolation_lr"), ({"unlearning_ceiling": -1}, "defense.unlearning_ceiling"), ({"preset": "x"}, "defense.preset")],
)
def test_abl_bad_values(params, key):
    with pytest.raises(ConfigError, match=key):
        DEFENSES.create({"name": "abl", **params})


def test_every_lr_and_epoch_count_is_used(digits):
    engine = engine_for(digits)
    DEFENSES.create(
        {"name": "abl", "isolation_epochs": 1, "isolation_lr": 0.03, "recovery_epochs": 2, "recovery_lr": 0.04,
         "recovery_milestones": [1], "unlearning_epochs": 3, "unlearning_lr": 0.002}
    ).run(engine)
    lrs = [round(h["lr"], 6) for h in engine.history]
    assert lrs == [0.03, 0.04, 0.004, 0.002, 0.002, 0.002]

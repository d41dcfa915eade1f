"""Sleeper Agent (Souri et al., NeurIPS 2022): gradient-matching poisons, clean-label, within
the budget, cached apart from feature collision."""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS, surrogate
from abl.errors import ConfigError

SPEC = {"name": "sleeper_agent", "rate": 1.0, "target": 0, "source": 1, "steps": 40, "retrains": 0,
        "surrogate_model": "small_cnn", "surrogate_epochs": 10}


@pytest.fixture(scope="module")
def digits16():
    from abl.data import DATASETS

    return DATASETS.create({"name": "digits", "size": 16}).load().train


def test_crafting_aligns_the_poisons_gradient_and_stays_clean_label(digits16, tmp_path, surrogate_trainings):
    torch.set_num_threads(1)
    attack = ATTACKS.create({**SPEC, "cache_dir": str(tmp_path)})
    attack.setup(16, 10)
    data = attack.poison(digits16)
    m = attack.fit_metrics()
    # measured with 120 steps and 3 retrains: 0.63 -> 0.95
    assert m["grad_cos_after"] > m["grad_cos_before"] + 0.15, m
    assert len(surrogate_trainings) == 1
    poisoned = data.poison_mask
    assert bool((data.labels[poisoned] == 0).all()) and torch.equal(data.labels, data.true_labels), "clean-label"
    diff = (data.images[poisoned].float() - digits16.images[poisoned].float()).abs().max() / 255
    assert 0 < float(diff) <= 16 / 255 + 1 / 255, "perturbed within the budget (and uint8 rounding)"
    # cached apart from feature collision's poisons of the same settings
    fc = ATTACKS.create({**{k: v for k, v in SPEC.items() if k != "retrains"}, "name": "fc", "cache_dir": str(tmp_path)})
    fc.setup(16, 10)
    fc_data = fc.poison(digits16)
    assert not torch.equal(fc_data.images[poisoned], data.images[poisoned])
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "attacks").glob("*.safetensors"))
    assert "sleeper_agent" in files and "fc" in files
    again = ATTACKS.create({**SPEC, "cache_dir": str(tmp_path)})
    again.setup(16, 10)
    assert torch.equal(again.poison(digits16).images, data.images) and again.fit_metrics() == {}, "read from the cache"


def test_sleeper_agent_rejects_bad_parameters():
    with pytest.raises(ConfigError, match="attack.retrains"):
        ATTACKS.create({**SPEC, "retrains": -1})
    with pytest.raises(ConfigError, match="attack.watermark"):
        ATTACKS.create({**SPEC, "watermark": 0.2})


def test_retraining_during_crafting_trains_fresh_surrogates_on_the_poisoned_set(digits32, tmp_path, monkeypatch):
    seen = []
    real = surrogate.train_clean_model

    def spy(train, *args, **kwargs):
        seen.append(train.images.clone())
        return real(train, *args, **kwargs)

    monkeypatch.setattr(surrogate, "train_clean_model", spy)
    attack = ATTACKS.create({**SPEC, "retrains": 2, "steps": 6, "surrogate_epochs": 2, "cache_dir": str(tmp_path)})
    attack.setup(32, 10)
    data = attack.poison(digits32)
    assert len(seen) == 3, "the clean surrogate, then one per retrain"
    assert torch.equal(seen[0], digits32.images), "first on the clean set"
    poisoned = data.poison_mask
    assert not torch.equal(seen[1][poisoned], digits32.images[poisoned]), "then on the set with the current poisons"
    assert torch.equal(seen[1][~poisoned], digits32.images[~poisoned])

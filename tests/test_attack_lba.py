"""LBA, the latent backdoor in its data-poisoning form (Yao et al., CCS 2019): the patch is
optimised so that a clean model's representation of triggered images moves to the target
class's mean."""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS
from abl.errors import ConfigError


def test_the_trigger_moves_the_latent_representation_toward_the_target(digits32, tmp_path):
    """Measured on all 1,797 digits at 32x32 (small-CNN surrogate, 10 epochs, 6x6 patch,
    500 steps): squared distance to the target's mean representation 0.0915 for clean
    non-target images, 0.0848 with a random patch, 0.0534 with the trigger. Poisoned at
    2%, a small CNN learned it (ASR 91.9%), no faster than a random patch (97.5%)."""
    torch.set_num_threads(1)
    attack = ATTACKS.create({"name": "lba", "rate": 0.05, "target": 0, "size": 6, "steps": 100, "lr": 0.1,
                             "surrogate_model": "small_cnn", "surrogate_epochs": 5, "cache_dir": str(tmp_path)})
    attack.setup(32, 10)
    data = attack.poison(digits32)
    gap = attack.fit_metrics()
    assert gap["latent_gap_trigger"] < 0.85 * gap["latent_gap_random"], gap
    arts = attack.artefacts()
    outside = arts["mask"] == 0
    assert bool((arts["pattern"][:, outside[0]] == 0).all()), "the pattern lives in the trigger region only"
    poisoned = data.images[data.poison_mask].float() / 255
    stamped = attack.apply(poisoned)
    assert torch.allclose(stamped, poisoned, atol=1 / 255 + 1e-6), "poisons carry the trigger (up to uint8 rounding)"
    # a second attack with the same settings reads the trigger from the cache
    again = ATTACKS.create({"name": "lba", "rate": 0.05, "target": 0, "size": 6, "steps": 100, "lr": 0.1,
                            "surrogate_model": "small_cnn", "surrogate_epochs": 5, "cache_dir": str(tmp_path)})
    again.setup(32, 10)
    again.poison(digits32)
    assert again.surrogate is None and torch.equal(again.artefacts()["pattern"], arts["pattern"])


@pytest.mark.parametrize("key, value", [("size", 0), ("steps", 0), ("lr", 0.0), ("labelling", "all2all"), ("layer", "conv1")])
def test_lba_rejects_bad_parameters(key, value):
    with pytest.raises(ConfigError, match=f"attack.{key}"):
        ATTACKS.create({"name": "lba", key: value})

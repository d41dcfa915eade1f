"""DFST (Cheng et al., AAAI 2021): a style trigger from an in-project generator, controlled
detoxification, the style domain from a folder or drawn procedurally, and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from abl.attacks import ATTACKS
from abl.attacks.dfst import load_style_folder, sunrise_styles
from abl.errors import ConfigError, DataError

SPEC = {"name": "dfst", "rate": 0.1, "target": 0, "surrogate_model": "small_cnn", "surrogate_epochs": 5,
        "style_steps": 150, "detox_rate": 0.05, "detox_layer": 1}


def warmth(x: torch.Tensor) -> float:
    """Mean red minus mean blue of uint8 or float images."""
    x = x.float() / (255 if x.dtype == torch.uint8 else 1)
    return float(x[:, 0].mean() - x[:, 2].mean())


def test_procedural_sunrise_styles_are_warm_and_seeded():
    a, b, c = sunrise_styles(6, 32, seed=0), sunrise_styles(6, 32, seed=0), sunrise_styles(6, 32, seed=1)
    assert a.shape == (6, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert warmth(a) > 0.25, "a warm palette: far more red than blue"


def test_style_folder_is_read_and_bad_folders_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_style_folder(str(tmp_path / "missing"), 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no image"):
        load_style_folder(str(empty), 16)
    good = tmp_path / "styles" / "sub"
    good.mkdir(parents=True)
    for i, colour in enumerate(((250, 120, 20), (200, 40, 90))):
        Image.fromarray(np.full((40, 30, 3), colour, dtype=np.uint8)).save(good / f"s{i}.png")
    styles = load_style_folder(str(tmp_path / "styles"), 16)
    assert styles.shape == (2, 3, 16, 16) and abs(float(styles[0, 0, 0, 0]) - 250 / 255) < 1e-6
    (good / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read"):
        load_style_folder(str(tmp_path / "styles"), 16)


def test_dfst_restyles_toward_the_style_and_detoxifies(digits32, tmp_path, surrogate_trainings):
    """Measured on 300 digits at 32x32 (small-CNN surrogate, 150 generator steps): see the
    assertions' messages for the figures."""
    torch.set_num_threads(1)
    attack = ATTACKS.create({**SPEC, "cache_dir": str(tmp_path)})
    attack.setup(32, 10)
    data = attack.poison(digits32)
    m = attack.fit_metrics()
    assert m["style_loss_restyled"] < 0.5 * m["style_loss_clean"], m
    assert len(surrogate_trainings) == 2, "the clean surrogate and one detoxification round"
    poisoned = data.poison_mask
    assert int(poisoned.sum()) == 30 and bool((data.labels[poisoned] == 0).all())
    assert bool((data.true_labels[poisoned] != 0).all())
    assert warmth(data.images[poisoned]) > warmth(digits32.images[poisoned]) + 0.05, "restyled toward the warm sky"
    # detoxicants: clean images (true labels, not poisons) within the budget that excite the
    # channels the restyled images excite
    detox = attack.mix_index
    assert len(detox) == 15 and not bool(poisoned[detox].any())
    assert torch.equal(data.labels[detox], digits32.labels[detox])
    diff = (data.images[detox].float() - digits32.images[detox].float()).abs().amax((1, 2, 3))
    assert bool((diff > 0).all()) and float(diff.max()) <= 16 + 1
    assert m["detox_lift_restyled"] > 1 and m["detox_lift_detoxicant"] > 1, m
    untouched = ~poisoned
    untouched[detox] = False
    assert torch.equal(data.images[untouched], digits32.images[untouched])
    arts = attack.artefacts()
    assert arts["examples_triggered"].shape == arts["examples_clean"].shape == (8, 3, 32, 32)
    assert any(k.startswith("generator.") for k in arts) and torch.equal(arts["mix_index"], detox)
    # a second attack of the same settings reads generator and detoxicants from the cache
    again = ATTACKS.create({**SPEC, "cache_dir": str(tmp_path)})
    again.setup(32, 10)
    assert torch.equal(again.poison(digits32).images, data.images) and len(surrogate_trainings) == 2
    # without detoxification nothing but the poisons changes
    plain = ATTACKS.create({**SPEC, "detox_rounds": 0, "cache_dir": str(tmp_path)})
    plain.setup(32, 10)
    plain_data = plain.poison(digits32)
    assert len(plain.mix_index) == 0 and torch.equal(plain_data.images[~poisoned], digits32.images[~poisoned])


@pytest.mark.parametrize("key, value", [("style_steps", 0), ("detox_rate", 1.0), ("detox_neurons", 0),
                                        ("detox_eps", 0.0), ("labelling", "all2all"), ("style_weight", 0.0)])
def test_dfst_rejects_bad_parameters(key, value):
    with pytest.raises(ConfigError, match=f"attack.{key}"):
        ATTACKS.create({"name": "dfst", key: value})


def test_dfst_detox_layer_beyond_the_model_names_the_key(digits32, tmp_path):
    attack = ATTACKS.create({**SPEC, "detox_layer": 7, "style_steps": 2, "surrogate_epochs": 1, "cache_dir": str(tmp_path)})
    attack.setup(32, 10)
    with pytest.raises(ConfigError, match="attack.detox_layer"):
        attack.poison(digits32)

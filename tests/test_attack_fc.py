"""The feature-collision (``fc``) hidden-trigger attack.

Tiny settings, as in test_attacks_optimized.py: 300 real digits images at 32x32, a
1-epoch ``small_cnn`` surrogate, a few optimisation steps, and a per-test cache directory.
"""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS, surrogate
from abl.data.loader import to_float
from abl.errors import ConfigError

TINY = {"surrogate_model": "small_cnn", "surrogate_epochs": 1, "steps": 20}
GRID = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)


def make(cache_dir, **params):
    attack = ATTACKS.create({"name": "fc", **TINY, "cache_dir": str(cache_dir), **params})
    attack.setup(32, 10)
    return attack


def test_apply_is_the_grid_trigger(tmp_path):
    attack = make(tmp_path)
    assert attack.clean_label and not attack.needs_fit
    x = torch.rand(4, 3, 32, 32)
    y = attack.apply(x.clone())  # no poison needed: the trigger is fixed
    assert y.shape == x.shape and y.dtype == x.dtype and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y[:, :, :29], x[:, :, :29]) and torch.equal(y[:, :, :, :29], x[:, :, :, :29])
    u = (attack.apply(torch.zeros(1, 3, 32, 32)) * 255).round().to(torch.uint8)[0]
    for c in range(3):
        assert torch.equal(u[c, 29:, 29:], GRID)
    arts = attack.artefacts()
    assert set(arts) == {"mask", "pattern"} and float(arts["mask"].sum()) == 9
    # other sizes tile the grid
    big = make(tmp_path, patch_size=5).apply(torch.zeros(1, 3, 32, 32))[0, 0, 27:, 27:]
    assert torch.equal(big, (GRID.float() / 255).repeat(2, 2)[:5, :5])


def test_poison_clean_label_budget_and_collision(digits32, tmp_path):
    eps = 16 / 255
    attack = make(tmp_path, rate=0.05, rate_of="dataset", target=0, source=1, eps=eps)
    data = attack.poison(digits32)
    m = data.poison_mask
    assert int(m.sum()) == round(0.05 * 300)
    assert data.images.dtype == torch.uint8 and data.images.shape == digits32.images.shape
    assert torch.equal(data.labels, digits32.labels) and torch.equal(data.true_labels, digits32.labels)
    assert bool((digits32.labels[m] == 0).all()), "only target-class images are poisoned"
    assert torch.equal(data.images[~m], digits32.images[~m])
    diff = (data.images.int() - digits32.images.int()).abs()
    assert int(diff.max()) <= eps * 255 + 1, "the perturbation must stay within eps everywhere"
    assert bool((diff[m].flatten(1).amax(1) > 0).all()), "every poisoned image is perturbed"
    arts = attack.artefacts()
    idx, src = arts["perturbed_indices"], arts["source_indices"]
    assert torch.equal(idx, m.nonzero().squeeze(1)) and len(src) == len(idx)
    assert bool((digits32.labels[src] == 1).all()) and len(set(src.tolist())) == len(src)
    assert arts["perturbed_images"].dtype == torch.uint8 and torch.equal(arts["perturbed_images"], data.images[m])
    # the optimisation pulls the features towards the paired triggered source images
    model = attack.load_surrogate(digits32, 10, "cpu", surrogate.data_fingerprint(digits32))
    with torch.no_grad():
        goal = model.features(attack.apply(to_float(digits32.images[src])))
        before = (model.features(to_float(digits32.images[idx])) - goal).pow(2).sum(1)
        after = (model.features(to_float(data.images[idx])) - goal).pow(2).sum(1)
    assert float(after.mean()) < 0.7 * float(before.mean()), (before.mean(), after.mean())
    assert float((after < before).float().mean()) >= 0.9, (before, after)


def test_watermark_blends_the_triggered_source_in(digits32, tmp_path):
    """Shafahi et al.'s end-to-end recipe: the eps ball is centred on the watermarked image."""
    eps, opacity = 8 / 255, 0.3
    attack = make(tmp_path, rate=0.05, rate_of="dataset", eps=eps, watermark=opacity, steps=5)
    data = attack.poison(digits32)
    arts = attack.artefacts()
    idx, src = arts["perturbed_indices"], arts["source_indices"]
    centre = torch.lerp(to_float(digits32.images[idx]), attack.apply(to_float(digits32.images[src])), opacity)
    gap = (to_float(data.images[idx]) - centre).abs()
    assert float(gap.max()) <= eps + 1 / 255, "the perturbation stays within eps of the watermarked image"
    plain = (to_float(data.images[idx]) - to_float(digits32.images[idx])).abs()
    assert float(plain.max()) > eps + 2 / 255, "the watermark moves the images beyond eps"
    # the poisons carry the trigger at about the watermark's opacity
    corner = to_float(data.images[idx])[:, :, 29:, 29:]
    expected = torch.lerp(to_float(digits32.images[idx])[:, :, 29:, 29:], GRID.float() / 255, opacity)
    assert float((corner - expected).abs().max()) <= eps + 2 / 255
    # and it is its own cache entry
    assert len(list((tmp_path / "attacks").glob("fc-*.safetensors"))) == 1
    make(tmp_path, rate=0.05, rate_of="dataset", eps=eps, steps=5).poison(digits32)
    assert len(list((tmp_path / "attacks").glob("fc-*.safetensors"))) == 2


def test_pairing_with_replacement_when_few_sources(digits32, tmp_path):
    # keep only 3 source-class images: 15 poisoned images must share them
    keep = torch.cat([(digits32.labels != 1).nonzero().squeeze(1), (digits32.labels == 1).nonzero().squeeze(1)[:3]])
    small = digits32.subset(keep.sort().values)
    attack = make(tmp_path, rate=0.05, rate_of="dataset", steps=2)
    attack.poison(small)
    src = attack.artefacts()["source_indices"]
    assert len(src) == round(0.05 * len(small)) and bool((small.labels[src] == 1).all())
    assert len(set(src.tolist())) <= 3


def test_seed_determinism_and_cache(digits32, tmp_path, monkeypatch, surrogate_trainings):
    calls = surrogate_trainings
    a = make(tmp_path / "a", seed=1, rate=0.05, rate_of="dataset").poison(digits32)
    b = make(tmp_path / "b", seed=1, rate=0.05, rate_of="dataset").poison(digits32)  # fresh cache: recomputed
    assert len(calls) == 2
    assert torch.equal(a.images, b.images) and torch.equal(a.poison_mask, b.poison_mask)
    c = make(tmp_path / "a", seed=2, rate=0.05, rate_of="dataset").poison(digits32)  # surrogate reused, new poison set
    assert len(calls) == 2
    assert not torch.equal(a.poison_mask, c.poison_mask) and not torch.equal(a.images, c.images)

    def boom(*args, **kwargs):
        raise AssertionError("the perturbed set should come from the cache")

    monkeypatch.setattr(surrogate, "train_clean_model", boom)
    monkeypatch.setattr(type(make(tmp_path / "a")), "_collide", boom)
    again = make(tmp_path / "a", seed=1, rate=0.05, rate_of="dataset").poison(digits32)
    assert torch.equal(again.images, a.images)
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "a" / "attacks").glob("*.safetensors"))
    assert files == ["fc", "fc", "surrogate"]


def test_triggered_test_is_source_only(digits32, tmp_path):
    attack = make(tmp_path, source=4, target=2)
    test = digits32.subset(torch.arange(100))
    trig = attack.triggered_test(test)
    assert torch.equal(attack.test_mask(test.labels), test.labels == 4)
    assert len(trig) == int((test.labels == 4).sum()) > 0
    assert bool((trig.true_labels == 4).all()) and bool((trig.attack_labels == 2).all())
    assert trig.images.dtype == torch.uint8
    assert bool((trig.images[:, :, 29:, 29:] == GRID).all())
    assert torch.equal(trig.images[:, :, :29], test.images[test.labels == 4][:, :, :29])


def test_bad_params_name_their_key():
    for key, value in (("eps", 0.0), ("eps", 1.5), ("steps", 0), ("lr", 0.0), ("patch_size", 0), ("watermark", 1.0), ("watermark", -0.1), ("source", -1), ("surrogate_model", "nope")):
        with pytest.raises(ConfigError, match=f"attack.{key}"):
            ATTACKS.create({"name": "fc", key: value})
    with pytest.raises(ConfigError, match="attack.source"):
        ATTACKS.create({"name": "fc", "source": 0, "target": 0})
    with pytest.raises(ConfigError, match="attack.source"):
        ATTACKS.create({"name": "fc", "source": 10}).setup(32, 10)
    with pytest.raises(ConfigError, match="attack.target"):
        ATTACKS.create({"name": "fc", "target": 12}).setup(32, 10)
    with pytest.raises(ConfigError, match="attack.labelling"):
        ATTACKS.create({"name": "fc", "labelling": "all2all"})
    with pytest.raises(ConfigError, match="attack.patch_size"):
        ATTACKS.create({"name": "fc", "patch_size": 40}).setup(32, 10)

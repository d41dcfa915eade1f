"""Contract tests over every registered attack, plus each attack's own trigger facts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from abl.attacks import ATTACKS
from abl.data.types import ImageSplit
from abl.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TROJAN_FILE = SHARED / "triggers" / "abl-official-trojan-cifar10.npz"
SIG_FILE = SHARED / "triggers" / "abl-official-sig-cifar10.npy"
FAST_SURROGATE = {"surrogate_model": "small_cnn", "surrogate_epochs": 1}
# attack-specific knobs that only cut the cost of fitting (the contract is about shapes)
FAST_FIT = {"dynamic": {"mask_epochs": 1, "generator_width": 8}, "sleeper_agent": {"steps": 3, "retrains": 1}, "lba": {"steps": 5},
            "dfst": {"style_steps": 3, "detox_steps": 2, "style_images": 8}}
# rate as a fraction of the whole training set for every attack, named (the default since
# issue 24; rate_of: target_class is covered by tests/test_attack_variants.py)
WHOLE_SET = {name: {"rate_of": "dataset"} if ATTACKS.get(name).clean_label else {} for name in ATTACKS.names()}


def _trigger_file(name: str) -> Path:
    path = TROJAN_FILE if name == "trojan" else SIG_FILE
    if not path.is_file():
        pytest.fail(f"{path} is missing: the attack tests need ../shared/data/triggers beside the repo")
    return path


def make_attack(name: str, **params):
    spec = {"name": name, **params}
    if name == "trojan":
        spec.setdefault("trigger_file", str(_trigger_file("trojan")))
    if "surrogate_epochs" in {f.name for f in dataclasses.fields(ATTACKS.get(name))}:
        for key, value in FAST_SURROGATE.items():  # the contract is about shapes, not strength
            spec.setdefault(key, value)
    for key, value in FAST_FIT.get(name, {}).items():
        spec.setdefault(key, value)
    attack = ATTACKS.create(spec)
    attack.setup(32, 10)
    if attack.needs_fit:  # the trigger is optimised on the training set
        attack.poison(split())
    return attack


def split(n: int = 600, seed: int = 0) -> ImageSplit:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % 10
    return ImageSplit(images, labels)


@pytest.mark.parametrize("name", ATTACKS.names())
class TestAttackContract:
    def test_apply_keeps_shape_range_dtype(self, name):
        attack = make_attack(name)
        x = torch.rand(8, 3, 32, 32)
        y = attack.apply(x.clone())
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert not torch.equal(x, y), "the trigger must change the images"

    def test_apply_is_deterministic_and_batch_independent(self, name):
        attack = make_attack(name)
        x = torch.rand(6, 3, 32, 32)
        a = attack.apply(x.clone())
        b = torch.cat([attack.apply(x[:2].clone()), attack.apply(x[2:].clone())])
        assert torch.allclose(a, b)

    def test_poison_rate_honoured_and_recorded(self, name):
        attack = make_attack(name, rate=0.05, **WHOLE_SET[name])
        data = attack.poison(split())
        assert int(data.poison_mask.sum()) == round(0.05 * 600)
        assert data.images.dtype == torch.uint8 and data.images.shape == (600, 3, 32, 32)
        clean = ~data.poison_mask
        # an attack may also change images it does not poison, keeping their labels (CBA's
        # same-class "mix" composites); it lists them in mix_index
        mixed = getattr(attack, "mix_index", torch.zeros(0, dtype=torch.long))
        clean[mixed] = False
        original = split()
        assert torch.equal(data.images[clean], original.images[clean]), "unpoisoned images must be untouched"
        assert torch.equal(data.labels[clean], original.labels[clean])
        assert torch.equal(data.true_labels, original.labels)
        changed = (data.images[data.poison_mask] != original.images[data.poison_mask]).flatten(1).any(1)
        assert bool(changed.all()), "every poisoned image must carry the trigger"

    def test_labels(self, name):
        attack = make_attack(name, rate=0.05, target=3)
        data = attack.poison(split())
        poisoned = data.poison_mask
        if attack.clean_label:
            assert bool((data.true_labels[poisoned] == 3).all()), "clean-label attacks poison target-class images only"
            assert torch.equal(data.labels, data.true_labels)
        else:
            assert bool((data.labels[poisoned] == 3).all())
            assert bool((data.true_labels[poisoned] != 3).all())

    def test_seed_determinism(self, name):
        a = make_attack(name, seed=1, rate=0.05, **WHOLE_SET[name]).poison(split())
        b = make_attack(name, seed=1, rate=0.05, **WHOLE_SET[name]).poison(split())
        c = make_attack(name, seed=2, rate=0.05, **WHOLE_SET[name]).poison(split())
        assert torch.equal(a.poison_mask, b.poison_mask) and torch.equal(a.images, b.images)
        if getattr(ATTACKS.get(name), "selection", "random") == "max_gradient":
            # chosen by the surrogate's gradient norms (Sleeper Agent), not by the seed
            assert torch.equal(a.poison_mask, c.poison_mask)
        else:
            assert not torch.equal(a.poison_mask, c.poison_mask)

    def test_triggered_test_excludes_target(self, name):
        attack = make_attack(name, target=2)
        test = split(200, seed=5)
        trig = attack.triggered_test(test)
        assert len(trig) == int(attack.test_mask(test.labels).sum()) > 0
        assert bool((trig.true_labels != 2).all()) and bool((trig.attack_labels == 2).all())
        assert trig.images.dtype == torch.uint8

    def test_invalid_rate_names_the_key(self, name):
        with pytest.raises(ConfigError, match="attack.rate"):
            make_attack(name, rate=1.5)

    def test_target_out_of_range(self, name):
        attack = ATTACKS.create({"name": name, "target": 12, **({"trigger_file": str(_trigger_file("trojan"))} if name == "trojan" else {})})
        with pytest.raises(ConfigError, match="attack.target"):
            attack.setup(32, 10)

    def test_artefacts_are_tensors(self, name):
        attack = make_attack(name)
        arts = attack.artefacts()
        assert arts and all(isinstance(v, torch.Tensor) for v in arts.values())


def test_badnets_is_the_authors_grid():
    attack = make_attack("badnets")
    y = (attack.apply(torch.zeros(1, 3, 32, 32)) * 255).round().to(torch.uint8)[0]
    expected = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    for c in range(3):
        assert torch.equal(y[c, 29:, 29:], expected)
    assert int(y[:, :29].sum()) == 0 and int(y[:, :, :29].sum()) == 0


def test_badnets_size_and_position():
    attack = make_attack("badnets", size=4, position=[2, 5], pattern="white")
    y = attack.apply(torch.zeros(1, 3, 32, 32))[0]
    assert float(y[:, 2:6, 5:9].min()) == 1.0
    assert float(y.sum()) == 3 * 16
    with pytest.raises(ConfigError, match="attack.position"):
        make_attack("badnets", size=4, position=[30, 30])


def test_default_test_mask_is_every_non_target_image():
    attack = make_attack("badnets", target=2)
    labels = torch.arange(100) % 10
    assert torch.equal(attack.test_mask(labels), labels != 2)


def test_all2all_relabels_to_next_class():
    attack = make_attack("badnets", labelling="all2all", rate=0.2)
    data = attack.poison(split())
    m = data.poison_mask
    assert torch.equal(data.labels[m], (data.true_labels[m] + 1) % 10)
    trig = attack.triggered_test(split(100))
    assert len(trig) == 100 and torch.equal(trig.attack_labels, (trig.true_labels + 1) % 10)


def test_blend_is_a_convex_mix():
    attack = make_attack("blend", alpha=0.2)
    x = torch.rand(2, 3, 32, 32)
    y = attack.apply(x.clone())
    assert torch.allclose(y, 0.8 * x + 0.2 * attack.pattern_image)


def test_trojan_matches_the_authors_file():
    attack = make_attack("trojan")
    raw = np.load(_trigger_file("trojan"))["x"]
    x = torch.zeros(1, 3, 32, 32)
    y = attack.apply(x)[0].numpy()
    assert np.allclose(y * 255, np.clip(raw, 0, 255), atol=1e-3)
    assert y[:, 25:28, 25:28].max() > 0 and y[:, :25].max() == 0


def test_trojan_requires_a_file(tmp_path):
    with pytest.raises(ConfigError, match="attack.trigger_file"):
        ATTACKS.create({"name": "trojan"})
    attack = ATTACKS.create({"name": "trojan", "trigger_file": str(tmp_path / "nope.npz")})
    with pytest.raises(DataError, match="does not exist"):
        attack.setup(32, 10)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    attack = ATTACKS.create({"name": "trojan", "trigger_file": str(bad)})
    with pytest.raises(DataError, match="cannot read"):
        attack.setup(32, 10)


def test_sig_signal_and_the_authors_file():
    attack = make_attack("sig")
    j = torch.arange(32, dtype=torch.float32)
    expected = 20 * torch.sin(2 * torch.pi * j * 6 / 32)
    assert torch.allclose(attack.signal[1, 7] * 255, expected, atol=1e-4)
    # The authors' uint8 file wrapped negative values to 236-255; read as signed it is 20*sin(0.8 j).
    official = make_attack("sig", pattern_file=str(_trigger_file("sig")))
    row = official.signal[0, 0] * 255
    assert float(row.min()) < -15 and float(row.max()) > 15
    assert torch.allclose(row, (20 * torch.sin(0.8 * j)).trunc(), atol=1.0)


def test_clean_label_rate_cannot_exceed_target_class():
    attack = make_attack("sig", rate=0.5, rate_of="dataset")
    with pytest.raises(ConfigError, match="target-class"):
        attack.poison(split())


def test_unknown_attack_lists_known():
    with pytest.raises(ConfigError, match="known attacks: badnets"):
        ATTACKS.create({"name": "nope"})


def test_unknown_param_names_key():
    with pytest.raises(ConfigError, match="attack.sizee"):
        ATTACKS.create({"name": "badnets", "sizee": 3})


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_passes_the_runs_preflight_on_a_fixed_size_dataset(name, tmp_path):
    """`abl run` builds the trigger before loading the data when the dataset fixes the image
    size (CIFAR-10: 32), so no class count is known yet; CBA once read it there and every
    CIFAR-10 CBA run died with an AttributeError."""
    from abl.experiment import build_experiment, preflight

    attack = {"name": name, **({"trigger_file": str(_trigger_file(name))} if name == "trojan" else {})}
    exp = build_experiment({"dataset": {"name": "cifar10", "root": str(tmp_path / "cifar10")},
                            "model": {"name": "wrn", "depth": 16, "widen": 1}, "attack": attack,
                            "defense": {"name": "none"}})
    assert preflight(exp, tmp_path / "runs") == 32


def test_cba_refuses_classes_the_dataset_does_not_have():
    attack = ATTACKS.create({"name": "cba", "class_a": 5, "class_b": 12})
    with pytest.raises(ConfigError, match="attack.class_b.*is 12 but the dataset has 10 classes"):
        attack.setup(32, 10)

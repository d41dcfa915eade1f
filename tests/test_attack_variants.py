"""Options that reproduce the ABL authors' code (bboylyg/ABL at 3fd736c) where it differs
from our defaults: clean-label rate semantics, poison candidates, per-image Blend noise,
the blended SIG mask, Trojan's uint8 wrap-around, and CA without the target class.

Each test fails if its option is ignored. The trigger files come from ``../shared/data``;
a missing file fails the test (never skips it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from abl.attacks import ATTACKS
from abl.config import to_plain
from abl.data.loader import to_float
from abl.data.types import ImageSplit, TriggeredTestSet
from abl.errors import ConfigError
from abl.metrics import evaluate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def trigger_file(name: str) -> str:
    path = SHARED / "triggers" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: these tests need ../shared/data/triggers beside the repo")
    return str(path)


def make(name: str, **params):
    if name == "trojan":
        params.setdefault("trigger_file", trigger_file("abl-official-trojan-cifar10.npz"))
    attack = ATTACKS.create({"name": name, **params})
    attack.setup(32, 10)
    return attack


def split(n: int = 600, seed: int = 0) -> ImageSplit:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return ImageSplit(images, torch.arange(n) % 10)  # 60 images per class


# ------------------------------------------------------------------ rate_of


@pytest.mark.parametrize("name", ["sig", "cl", "fc"])
def test_clean_label_rate_counts_within_the_target_class_when_asked(name):
    labels = torch.arange(600) % 10
    attack = ATTACKS.create({"name": name, "rate": 0.1, "target": 2, "rate_of": "target_class"})
    assert attack.clean_label
    mask = attack.select(labels)
    assert int(mask.sum()) == 6 and bool((labels[mask] == 2).all())  # 10% of 60
    whole = ATTACKS.create({"name": name, "rate": 0.1, "target": 2})  # the default: a share of the set
    assert whole.rate_of == "dataset" and int(whole.select(labels).sum()) == 60  # 10% of 600: every class-2 image
    every = ATTACKS.create({"name": name, "rate": 1.0, "target": 2, "rate_of": "target_class"})
    assert torch.equal(every.select(labels), labels == 2)


def test_rate_of_is_validated_and_recorded():
    assert ATTACKS.create({"name": "badnets"}).rate_of == "dataset"
    with pytest.raises(ConfigError, match="attack.rate_of"):
        ATTACKS.create({"name": "badnets", "rate_of": "target_class"})
    with pytest.raises(ConfigError, match="attack.rate"):
        ATTACKS.create({"name": "sig", "rate": 1.0, "rate_of": "dataset"})
    with pytest.raises(ConfigError, match="attack.rate_of"):
        ATTACKS.create({"name": "sig", "rate_of": "class"})
    with pytest.raises(ConfigError, match="no example of 6 target-class"):
        ATTACKS.create({"name": "sig", "rate": 0.01, "rate_of": "target_class"}).select(torch.arange(60) % 10)
    plain = to_plain(ATTACKS.create({"name": "sig"}))
    assert plain["rate_of"] == "dataset" and plain["poison_candidates"] == "non_target"


# ------------------------------------------------------------------ poison_candidates


def test_poison_candidates_all_includes_target_class_images():
    data = make("badnets", rate=0.5, target=0, poison_candidates="all").poison(split())
    m = data.poison_mask
    assert int(m.sum()) == 300
    assert int((data.true_labels[m] == 0).sum()) > 0, "target-class images are candidates too"
    assert bool((data.labels[m] == 0).all()), "and keep the target label"
    assert bool((data.images[m] != split().images[m]).flatten(1).any(1).all()), "every poisoned image is triggered"
    default = make("badnets", rate=0.5, target=0).poison(split())
    assert int((default.true_labels[default.poison_mask] == 0).sum()) == 0
    # 570 poisons fit only when the 60 target-class images are candidates
    assert int(make("badnets", rate=0.95, poison_candidates="all").select(split().labels).sum()) == 570
    with pytest.raises(ConfigError, match="non-target"):
        make("badnets", rate=0.95).select(split().labels)


def test_poison_candidates_is_validated():
    for spec in ({"name": "sig"}, {"name": "badnets", "labelling": "all2all"}):
        with pytest.raises(ConfigError, match="attack.poison_candidates"):
            ATTACKS.create({**spec, "poison_candidates": "all"})


# ------------------------------------------------------------------ Blend per-image noise


def test_blend_per_image_gray_noise():
    attack = make("blend", pattern="per_image_gray", alpha=0.2)
    y = attack.apply_at(torch.zeros(4, 3, 32, 32), torch.tensor([3, 9, 4, 1]), "train") / 0.2
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2]), "grayscale: one value per pixel"
    assert all(not torch.equal(y[0], y[k]) for k in (1, 2, 3)), "a fresh pattern per image"
    assert abs(float(y.mean()) - 0.5) < 0.03 and float(y.min()) == 0 and float(y.max()) == pytest.approx(1.0)
    assert attack.artefacts() == {}
    # deterministic in (pattern_seed, split, position), whatever the batch
    x = torch.rand(4, 3, 32, 32)
    idx = torch.tensor([3, 9, 4, 1])
    both = attack.apply_at(x, idx, "train")
    assert torch.equal(both[1:3], attack.apply_at(x[1:3], idx[1:3], "train"))
    assert torch.equal(both, make("blend", pattern="per_image_gray").apply_at(x, idx, "train"))
    assert torch.allclose(both, 0.8 * x + 0.2 * attack.noise(idx, "train"))
    assert not torch.equal(both, attack.apply_at(x, idx, "test")), "test positions draw other noise"
    assert not torch.equal(both, make("blend", pattern="per_image_gray", pattern_seed=1).apply_at(x, idx, "train"))


def test_blend_per_image_gray_poison_and_test_use_positions():
    attack = make("blend", pattern="per_image_gray", rate=0.1)
    train = split()
    data = attack.poison(train)
    idx = data.poison_mask.nonzero().squeeze(1)
    expected = (torch.lerp(to_float(train.images[idx]), attack.noise(idx, "train"), 0.2) * 255).round().to(torch.uint8)
    assert torch.equal(data.images[idx], expected)
    test = split(100, seed=3)
    trig = attack.triggered_test(test)
    keep = (test.labels != 0).nonzero().squeeze(1)
    expected = (torch.lerp(to_float(test.images[keep]), attack.noise(keep, "test"), 0.2) * 255).round().to(torch.uint8)
    assert torch.equal(trig.images, expected)
    with pytest.raises(ConfigError, match="attack.pattern"):
        ATTACKS.create({"name": "blend", "pattern": "per_image_gray", "pattern_file": "x.png"})


# ------------------------------------------------------------------ SIG official blend


def test_sig_official_blend_uses_the_stored_mask():
    path = trigger_file("abl-official-sig-cifar10.npy")
    raw = torch.from_numpy(np.load(path).astype(np.float32))  # unsigned, as the authors read it
    assert float(raw.max()) >= 236, "the file's wrapped negative half"
    attack = make("sig", mode="official_blend", pattern_file=path)
    assert attack.alpha == 0.2
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(attack.apply(x.clone()), 0.8 * x + 0.2 * raw / 255, atol=1e-6)
    data = attack.poison(split())
    m = data.poison_mask
    expected = 0.8 * split().images[m].float() + 0.2 * raw
    assert float((data.images[m].float() - expected).abs().max()) <= 0.5 + 1e-3
    additive = make("sig", pattern_file=path)  # our reading: signed, added
    assert not torch.allclose(additive.apply(x.clone()), attack.apply(x.clone()))


def test_sig_official_blend_needs_the_file():
    with pytest.raises(ConfigError, match="attack.pattern_file"):
        ATTACKS.create({"name": "sig", "mode": "official_blend"})
    with pytest.raises(ConfigError, match="attack.alpha"):
        ATTACKS.create({"name": "sig", "alpha": 0.0})


# ------------------------------------------------------------------ Trojan wrap-around


def test_trojan_wrap_reproduces_the_uint8_cast():
    raw = np.load(trigger_file("abl-official-trojan-cifar10.npz"))["x"]  # (3, 32, 32), 0-250
    images = split(20).images
    attack = make("trojan", overflow="wrap")
    got = attack.apply_uint8(images)
    # the authors' code: uint8 image + float trigger, cast back to uint8 (truncate, wrap)
    expected = np.floor(images.numpy().astype(np.float64) + raw).astype(np.int64) % 256
    assert np.array_equal(got.numpy(), expected)
    patch = (slice(None), slice(None), slice(25, 28), slice(25, 28))
    wrapped = np.floor(images.numpy()[patch].astype(np.float64) + raw[:, 25:28, 25:28]) > 255
    assert 0.2 < wrapped.mean() < 0.8, "a good part of the patch wraps on random images"
    clamped = make("trojan").apply_uint8(images).numpy()
    assert (clamped[patch][wrapped] == 255).all() and (got.numpy()[patch][wrapped] < 255).all()
    with pytest.raises(ConfigError, match="attack.overflow"):
        make("trojan", overflow="wrap", mode="stamp")


def test_trojan_wrap_truncates_fractional_trigger_values(tmp_path):
    # the shipped file's fractions all lie below 0.5, where truncating and rounding agree
    trigger = np.zeros((3, 32, 32), dtype=np.float32)
    trigger[:, 0, 0] = 10.7
    np.save(tmp_path / "t.npy", trigger)
    images = torch.full((1, 3, 32, 32), 250, dtype=torch.uint8)
    wrap = make("trojan", trigger_file=str(tmp_path / "t.npy"), overflow="wrap").apply_uint8(images)
    assert wrap[0, :, 0, 0].tolist() == [4, 4, 4] and torch.equal(wrap[0, :, 1:], images[0, :, 1:])  # floor(260.7) - 256
    images[:] = 100
    assert make("trojan", trigger_file=str(tmp_path / "t.npy"), overflow="wrap").apply_uint8(images)[0, 0, 0, 0] == 110


# ------------------------------------------------------------------ clean_acc_nontarget


class _Lookup(torch.nn.Module):
    """Predicts the class written in pixel (0, 0) of channel 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return torch.nn.functional.one_hot(cls, 10).float() + 0 * self.dummy


def _images(classes: torch.Tensor) -> torch.Tensor:
    images = torch.zeros(len(classes), 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = classes.to(torch.uint8)
    return images


def test_clean_acc_nontarget():
    labels = torch.arange(20) % 10
    preds = labels.clone()
    preds[labels == 0] = 1  # every target-class image wrong, the rest right
    clean = ImageSplit(_images(preds), labels)
    true = labels[labels != 0]
    one = TriggeredTestSet(_images(torch.zeros(18, dtype=torch.long)), true, torch.zeros(18, dtype=torch.long))
    out = evaluate(_Lookup(), clean, one)
    assert out["clean_acc"] == pytest.approx(0.9) and out["clean_acc_nontarget"] == 1.0 and out["asr"] == 1.0
    # a target the model gets right everywhere else: only that class is left out
    out = evaluate(_Lookup(), clean, TriggeredTestSet(one.images, labels[labels != 3], torch.full((18,), 3)))
    assert out["clean_acc_nontarget"] == pytest.approx(16 / 18)
    all2all = TriggeredTestSet(_images(true), true, (true + 1) % 10)
    assert "clean_acc_nontarget" not in evaluate(_Lookup(), clean, all2all)
    assert set(evaluate(_Lookup(), clean, None)) == {"clean_acc"}

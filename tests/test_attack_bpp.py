"""BppAttack: the authors' defaults, the squeeze, the batched dithering and the negatives.

The registry-wide contract (shape, range, determinism, recorded poisons, labels) is in
tests/test_attacks.py, which picks ``bpp`` up from the registry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abl.attacks import ATTACKS
from abl.attacks.bpp import floyd_steinberg, squeeze
from abl.errors import ConfigError
from attack_images import smooth_images, split


def make(**params):
    attack = ATTACKS.create({"name": "bpp", **params})
    attack.setup(32, 10)
    return attack


def reference_dither(image: np.ndarray, levels: int) -> np.ndarray:
    """Floyd-Steinberg on one ``(C, H, W)`` image on the 0-255 scale, pixel by pixel, as
    RU-System-Software-and-Security/BppAttack at f6b6580, ``bppattack.py`` lines 118-136
    (``floydDitherspeed``), rewritten in plain numpy."""
    image = image.astype(np.float64).copy()
    _, h, w = image.shape
    for y in range(h):
        for x in range(w):
            old = image[:, y, x].copy()
            new = np.round(old / 255.0 * (levels - 1)) / (levels - 1) * 255
            error = old - new
            image[:, y, x] = new
            if x + 1 < w:
                image[:, y, x + 1] += error * 0.4375
            if (y + 1 < h) and (x + 1 < w):
                image[:, y + 1, x + 1] += error * 0.0625
            if y + 1 < h:
                image[:, y + 1, x] += error * 0.3125
            if (x - 1 >= 0) and (y + 1 < h):
                image[:, y + 1, x - 1] += error * 0.1875
    return image


def test_bpp_defaults_are_the_authors():
    """RU-System-Software-and-Security/BppAttack at f6b6580: ``README.md`` line 8 (the CIFAR-10
    command, ``--squeeze_num 32``: 5 bits) and ``config.py`` (line named in the row); the
    rate is this library's 0.1 (the ABL paper's), with one negative per poison as the
    authors' equal ``--injection_rate`` and ``--neg_rate``."""
    table = [
        ("bit_depth", 5, "README.md:8 --squeeze_num 32 = 2**5 levels"),
        ("dithering", True, "the paper's trigger; config.py:30 --dithering (type=bool: any value given turns it on)"),
        ("negative_ratio", 1.0, "config.py:25-26 --injection_rate 0.2, --neg_rate 0.2"),
        ("target", 0, "config.py:24 --target_label 0"),
        ("labelling", "all2one", "config.py:15 --attack_mode all2one"),
    ]
    attack = ATTACKS.create({"name": "bpp"})
    for field, value, source in table:
        assert getattr(attack, field) == value, f"{field}: {getattr(attack, field)!r} != {value!r} ({source})"
    assert attack.levels == 32


@pytest.mark.parametrize("dithering", [False, True])
def test_the_squeeze_keeps_at_most_two_to_the_depth_levels(dithering):
    attack = make(bit_depth=3, dithering=dithering)
    x = torch.rand(16, 3, 32, 32)
    y = attack.apply(x.clone())
    grid = torch.arange(8, dtype=torch.float32) / 7
    for c in range(3):
        values = y[:, c].unique()
        assert len(values) <= 8
        assert bool(torch.isclose(values[:, None], grid[None]).any(1).all()), "every value sits on a level"
    stored = attack.apply_uint8((x * 255).round().to(torch.uint8))
    assert all(len(stored[:, c].unique()) <= 8 for c in range(3))


def test_plain_squeeze_is_rounding_to_the_nearest_level():
    """``bppattack.py`` line 182: ``round(x / 255 * (squeeze_num - 1)) / (squeeze_num - 1) * 255``."""
    x = torch.rand(4, 3, 32, 32)
    expected = torch.round(x * 255 / 255.0 * 31) / 31 * 255 / 255
    assert torch.allclose(make(dithering=False).apply(x.clone()), expected, atol=1e-6)
    assert torch.allclose(squeeze(x, 32), expected, atol=1e-6)


def test_batched_dithering_matches_the_authors_per_image_loop():
    images = (smooth_images(3, seed=2) * 255).round()
    ours = floyd_steinberg(images / 255, 32).double() * 255
    for i in range(3):
        ref = np.clip(reference_dither(images[i].numpy(), 32), 0, 255)
        assert np.allclose(ours[i].numpy(), ref, atol=1e-6)


def test_dithering_keeps_the_tone_that_squeezing_loses():
    """Error diffusion: a flat patch between two levels comes out as a mix of both whose
    mean is the patch's value; plain squeezing moves every pixel to the nearest level."""
    value = 0.36  # between the 3-bit levels 2/7 and 3/7, nearer 3/7
    x = torch.full((1, 3, 32, 32), value)
    dithered = make(bit_depth=3).apply(x.clone())
    squeezed = make(bit_depth=3, dithering=False).apply(x.clone())
    assert abs(float(dithered.mean()) - value) < 0.01
    assert abs(float(squeezed.mean()) - value) > 0.01
    assert len(dithered.unique()) == 2


def test_the_trigger_is_deterministic_and_small_at_the_default_depth():
    attack = make()
    x = smooth_images(8)
    a, b = attack.apply(x.clone()), attack.apply(x.clone())
    assert torch.equal(a, b)
    delta = (a - x).abs()
    assert float(delta.max()) <= 1.5 / 31 and float(delta.mean()) > 0


def test_negatives_keep_their_labels_and_carry_another_images_residual():
    train = split()
    attack = make(rate=0.05)
    data = attack.poison(train)
    neg, source = attack.mix_index, attack.residual_source
    n_poison = int(data.poison_mask.sum())
    assert n_poison == 30 and len(neg) == n_poison
    assert not bool(data.poison_mask[neg].any()), "negatives are not poisons"
    assert bool((source != neg).all()), "a negative never gets its own residual (that would be the trigger)"
    assert torch.equal(data.labels[neg], train.labels[neg])
    assert torch.equal(attack.artefacts()["mix_index"], neg)
    residual = attack.apply_uint8(train.images[source]).to(torch.int16) - train.images[source].to(torch.int16)
    expected = (train.images[neg].to(torch.int16) + residual).clamp(0, 255).to(torch.uint8)
    assert torch.equal(data.images[neg], expected)
    assert bool((data.images[neg] != train.images[neg]).flatten(1).any(1).all())
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[neg] = False
    rest &= ~data.poison_mask
    assert torch.equal(data.images[rest], train.images[rest])


def test_negatives_are_seeded_and_can_be_turned_off():
    a, b, c = (make(rate=0.05, seed=s) for s in (4, 4, 5))
    da, db, _ = (att.poison(split()) for att in (a, b, c))
    assert torch.equal(a.mix_index, b.mix_index) and torch.equal(a.residual_source, b.residual_source)
    assert torch.equal(da.images, db.images)
    assert not torch.equal(a.mix_index, c.mix_index)
    # the seed draws the negatives and their residuals' sources, not only the poisons
    (ia, sa), (ic, sc) = a.select_negatives(da.poison_mask), c.select_negatives(da.poison_mask)
    assert not torch.equal(ia, ic) and not torch.equal(sa, sc)
    off = make(rate=0.05, negative_ratio=0)
    data = off.poison(split())
    assert len(off.mix_index) == 0
    assert torch.equal(data.images[~data.poison_mask], split().images[~data.poison_mask])


@pytest.mark.parametrize(
    ("params", "key"),
    [({"bit_depth": 0}, "attack.bit_depth"), ({"bit_depth": 8}, "attack.bit_depth"),
     ({"negative_ratio": -0.5}, "attack.negative_ratio")],
)
def test_invalid_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        ATTACKS.create({"name": "bpp", **params})


def test_too_many_negatives_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"attack.negative_ratio.*lower"):
        make(rate=0.4, negative_ratio=2).poison(split())


def test_example_config_and_listing(capsys):
    """configs/cifar10-bpp-abl.yaml builds with the authors' values, and ``abl list attack
    bpp`` shows every BPP parameter with its default and a description."""
    from pathlib import Path

    from abl.cli import main
    from abl.config import load_yaml
    from abl.experiment import build_experiment

    path = Path(__file__).resolve().parents[1] / "configs" / "cifar10-bpp-abl.yaml"
    attack = build_experiment(load_yaml(path)).attack
    assert (attack.registered_name, attack.bit_depth, attack.dithering, attack.negative_ratio) == ("bpp", 5, True, 1.0)
    assert main(["list", "attack", "bpp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, default in (("bit_depth", "5"), ("dithering", "true"), ("negative_ratio", "1.0")):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[at].rstrip().endswith(f"= {default}") and len(lines[at + 1].strip()) > 10, lines[at : at + 2]

"""WaNet: the authors' defaults, the warp itself, and the noise-mode (cross) examples.

The registry-wide contract (shape, range, determinism, recorded poisons, labels) is in
tests/test_attacks.py, which picks ``wanet`` up from the registry.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from abl.attacks import ATTACKS
from abl.attacks.wanet import identity_grid
from abl.errors import ConfigError
from attack_images import smooth_images, split


def make(**params):
    attack = ATTACKS.create({"name": "wanet", **params})
    attack.setup(32, 10)
    return attack


def test_wanet_defaults_are_the_authors():
    """VinAIResearch/Warping-based_Backdoor_Attack-release at 45e8c33, ``config.py`` (line of
    each argument named in the row): the CIFAR-10 run is ``python train.py --dataset cifar10``
    with these defaults."""
    table = [
        ("k", 4, "config.py:31 --k 4"),
        ("s", 0.5, "config.py:30 --s 0.5"),
        ("grid_rescale", 1.0, "config.py:32-34 --grid-rescale 1"),
        ("cross_ratio", 2.0, "config.py:25 --cross_ratio 2 (rho_n = pc * cross_ratio)"),
        ("rate", 0.1, "config.py:24 --pc 0.1"),
        ("target", 0, "config.py:23 --target_label 0"),
        ("labelling", "all2one", "config.py:14 --attack_mode all2one"),
    ]
    attack = ATTACKS.create({"name": "wanet"})
    for field, value, source in table:
        assert getattr(attack, field) == value, f"{field}: {getattr(attack, field)!r} != {value!r} ({source})"


def test_warp_is_the_authors_construction():
    """``train.py`` lines 343-352 (the field: uniform k x k offsets over their mean magnitude,
    bicubic to the image size; the identity grid from ``meshgrid``), 72-73 (the warped grid)
    and 79 (``grid_sample`` with ``align_corners=True``), written out here step by step."""
    attack = make(grid_seed=3, s=0.7, grid_rescale=0.98)
    gen = torch.Generator().manual_seed(3)
    ins = torch.rand(1, 2, 4, 4, generator=gen) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=32, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=32)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity = torch.stack((y, x), 2)[None, ...]
    grid = torch.clamp((identity + 0.7 * noise_grid / 32) * 0.98, -1, 1)
    images = smooth_images(5)
    expected = F.grid_sample(images, grid.repeat(5, 1, 1, 1), align_corners=True)
    assert torch.allclose(attack.apply(images.clone()), expected, atol=1e-6)


def test_identity_grid_leaves_images_unchanged():
    x = smooth_images(3)
    y = F.grid_sample(x, identity_grid(32).expand(3, -1, -1, -1), align_corners=True)
    assert torch.allclose(x, y, atol=1e-6)


def test_the_warp_is_small():
    """Imperceptible: sub-pixel displacements, a small mean change and a high PSNR on
    smooth images, yet a real change of every image."""
    attack = make()
    shift = (attack.grid - identity_grid(32)) * 31 / 2  # in pixels
    assert 0.05 < float(shift.abs().mean()) < 0.5 and float(shift.abs().max()) < 1.0
    x = smooth_images(64)
    y = attack.apply(x.clone())
    delta = (y - x).abs()
    assert float(delta.mean()) < 0.02
    mse = (y - x).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse)
    assert float(psnr.min()) > 30, f"PSNR {float(psnr.min()):.1f} dB"
    assert bool((delta.flatten(1).amax(1) > 0).all())


def test_the_field_is_seeded_by_grid_seed():
    a, b, c = make(grid_seed=1), make(grid_seed=1), make(grid_seed=2)
    assert torch.equal(a.grid, b.grid) and not torch.equal(a.grid, c.grid)
    assert torch.equal(make(grid_seed=1, seed=5).grid, a.grid), "which images are poisoned must not change the warp"


def test_noise_mode_examples_keep_their_labels_and_are_recorded():
    train = split()
    attack = make(rate=0.05)
    data = attack.poison(train)
    cross = attack.mix_index
    n_poison = int(data.poison_mask.sum())
    assert n_poison == 30 and len(cross) == 2 * n_poison
    assert not bool(data.poison_mask[cross].any()), "noise-mode examples are not poisons"
    assert torch.equal(data.labels[cross], train.labels[cross])
    assert torch.equal(attack.artefacts()["mix_index"], cross)
    changed = (data.images[cross] != train.images[cross]).flatten(1).any(1)
    assert bool(changed.all()), "every noise-mode image is warped"
    plain = attack.apply_uint8(train.images[cross])
    assert not torch.equal(data.images[cross], plain), "the noise warp differs from the trigger"
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[cross] = False
    rest &= ~data.poison_mask
    assert torch.equal(data.images[rest], train.images[rest])


def test_noise_mode_is_a_small_perturbation_of_the_trigger_grid():
    """The authors' noise: per-pixel offsets uniform in [-1, 1] / H on top of the warp's grid
    (``train.py`` lines 75-77), so a noise-warped image differs from the warped one by at
    most a pixel's worth of resampling."""
    attack = make()
    x = smooth_images(16)
    noise = torch.rand(16, 32, 32, 2) * 2 - 1
    y_noise = attack.apply_noise(x.clone(), noise)
    expected = F.grid_sample(x, (attack.grid + noise / 32).clamp(-1, 1), align_corners=True)
    assert torch.allclose(y_noise, expected, atol=1e-6)
    assert float((y_noise - attack.apply(x.clone())).abs().mean()) < 0.03


def test_noise_mode_is_seeded():
    a, b, c = (make(rate=0.05, seed=s) for s in (4, 4, 5))
    da, db, dc = (att.poison(split()) for att in (a, b, c))
    assert torch.equal(a.mix_index, b.mix_index) and torch.equal(da.images, db.images)
    assert not torch.equal(a.mix_index, c.mix_index)
    # the seed draws the noise-mode examples and their noise, not only the poisons
    ia, ic = a.select_cross(da.poison_mask), c.select_cross(da.poison_mask)
    assert not torch.equal(ia, ic) and not torch.equal(a.cross_noise(ia[:3]), c.cross_noise(ia[:3]))
    assert torch.equal(a.cross_noise(ia[1:3]), a.cross_noise(ia[:3])[1:]), "an image's noise does not depend on its batch"


def test_cross_ratio_zero_turns_noise_mode_off():
    train = split()
    attack = make(rate=0.05, cross_ratio=0)
    data = attack.poison(train)
    assert len(attack.mix_index) == 0
    assert torch.equal(data.images[~data.poison_mask], train.images[~data.poison_mask])


@pytest.mark.parametrize(
    ("params", "key"),
    [({"k": 1}, "attack.k"), ({"s": 0}, "attack.s"), ({"grid_rescale": 1.5}, "attack.grid_rescale"),
     ({"cross_ratio": -1}, "attack.cross_ratio")],
)
def test_invalid_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        ATTACKS.create({"name": "wanet", **params})


def test_too_many_noise_examples_is_a_clear_error():
    attack = make(rate=0.4, cross_ratio=2)
    with pytest.raises(ConfigError, match=r"attack.cross_ratio.*lower"):
        attack.poison(split())


def test_grid_larger_than_the_image_is_a_config_error():
    attack = ATTACKS.create({"name": "wanet", "k": 40})
    with pytest.raises(ConfigError, match="attack.k"):
        attack.setup(32, 10)


def test_example_config_and_listing(capsys):
    """configs/cifar10-wanet-abl.yaml builds with the authors' values, and ``abl list attack
    wanet`` shows every WaNet parameter with its default and a description."""
    from pathlib import Path

    from abl.cli import main
    from abl.config import load_yaml
    from abl.experiment import build_experiment

    path = Path(__file__).resolve().parents[1] / "configs" / "cifar10-wanet-abl.yaml"
    attack = build_experiment(load_yaml(path)).attack
    assert (attack.registered_name, attack.k, attack.s, attack.grid_rescale, attack.cross_ratio) == ("wanet", 4, 0.5, 1.0, 2.0)
    assert main(["list", "attack", "wanet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, default in (("k", "4"), ("s", "0.5"), ("grid_rescale", "1.0"), ("cross_ratio", "2.0"), ("grid_seed", "0")):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[at].rstrip().endswith(f"= {default}") and len(lines[at + 1].strip()) > 10, lines[at : at + 2]

"""The input-aware dynamic (``dynamic``) attack: generators, fit, cache, victim ASR.

Small settings: 300 real digits images at 32x32 for the generator facts (width-8
generators, a few epochs, a ``small_cnn`` attacker classifier), and the full digits
set at 16x16 for the end-to-end check that a victim trained from scratch learns it.
"""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS
from abl.attacks.dynamic import Dynamic, TriggerGenerator, diversity_loss, sharpen
from abl.data import DATASETS
from abl.data.loader import to_float
from abl.errors import ConfigError

SMALL = {
    "surrogate_model": "small_cnn",
    "surrogate_epochs": 8,
    "surrogate_lr": 0.05,
    "surrogate_batch_size": 64,
    "mask_epochs": 5,
    "generator_width": 8,
}


# the module-scoped fit runs once: the whole file on one xdist worker
pytestmark = pytest.mark.xdist_group("attack-dynamic")


def make(cache_dir, size: int = 32, **params) -> Dynamic:
    attack = ATTACKS.create({"name": "dynamic", **SMALL, "cache_dir": str(cache_dir), **params})
    attack.setup(size, 10)
    return attack


@pytest.fixture(scope="module")
def fitted(digits32, tmp_path_factory):
    attack = make(tmp_path_factory.mktemp("dyn"), rate=0.1, target=0)
    data = attack.poison(digits32)
    return attack, data


def test_generator_shapes_and_range():
    x = torch.rand(2, 3, 32, 32)
    for out, width, depth in ((3, 8, 3), (1, 4, 2)):
        with torch.no_grad():
            y = TriggerGenerator(out, width, depth)(x)
        assert y.shape == (2, out, 32, 32) and float(y.min()) > 0 and float(y.max()) < 1
    m = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0])
    s = sharpen(m)
    assert float(s[0]) < 1e-3 and float(s[-1]) > 1 - 1e-3 and abs(float(s[2]) - 0.5) < 1e-3
    assert float(s[1]) < 0.01 and float(s[3]) > 0.99


def test_diversity_loss_rewards_distinct_triggers():
    x1, x2 = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    same = torch.full((4, 3, 8, 8), 0.5)
    distinct = diversity_loss(x1, x2, x1, x2)
    assert torch.isclose(distinct, torch.tensor(1.0))
    assert float(diversity_loss(x1, x2, same, same + 1e-3)) > 100 * float(distinct)


def test_masks_are_sparse_and_image_specific(fitted, digits32):
    attack, _ = fitted
    x = to_float(digits32.images[:64])
    pattern, mask = attack.trigger(x)
    assert pattern.shape == (64, 3, 32, 32) and mask.shape == (64, 1, 32, 32)
    # the mask-norm loss pushed the masks from ~0.5 everywhere to a few percent of pixels
    assert float(mask.mean()) < 0.15, float(mask.mean())
    on = (mask > 0.5).flatten(1).float().mean(1)
    assert bool((on > 0).all()), "every image gets some trigger pixels"
    # the diversity losses: different images, different masks and patterns
    assert float((mask[:32] - mask[32:]).pow(2).mean().sqrt()) > 0.05
    assert float((pattern[:32] - pattern[32:]).pow(2).mean().sqrt()) > 0.05


def test_poison_triggers_and_relabels(fitted, digits32):
    attack, data = fitted
    m = data.poison_mask
    assert int(m.sum()) == 30 and bool((data.labels[m] == 0).all()) and bool((data.true_labels[m] != 0).all())
    assert torch.equal(data.images[~m], digits32.images[~m]) and torch.equal(data.labels[~m], digits32.labels[~m])
    # each poisoned image is its own x + (G(x) - x) m(x), quantised
    x = to_float(digits32.images[m])
    pattern, mask = attack.trigger(x)
    expected = torch.lerp(x, pattern, mask).mul(255).round()
    assert float((expected - data.images[m].float()).abs().max()) <= 1.0
    # the trigger of one image pasted on another is not that image's own trigger
    cross = torch.lerp(x[1:2], pattern[:1], mask[:1])
    assert float((cross - torch.lerp(x[1:2], pattern[1:2], mask[1:2])).abs().max()) > 0.1


def test_attacker_classifier_learns_the_backdoor(fitted):
    attack, _ = fitted
    acc = attack.fit_accuracy
    assert set(acc) == {"clean", "backdoor", "cross"}
    assert acc["backdoor"] >= 0.8, acc
    arts = attack.artefacts()
    assert any(k.startswith("pattern.") for k in arts) and any(k.startswith("mask.") for k in arts)
    assert torch.equal(arts["fit_accuracy"], torch.tensor([acc["clean"], acc["backdoor"], acc["cross"]]))


def test_victim_trained_from_scratch_learns_it(tmp_path):
    """The ABL paper's use: the generators poison 10% of the set, a fresh model trains on it."""
    from abl.attacks.surrogate import train_clean_model
    from abl.data.types import ImageSplit

    splits = DATASETS.create({"name": "digits"}).load()  # 1,347 / 450 at 16x16
    attack = make(tmp_path, size=16, rate=0.1, target=0, surrogate_epochs=10)
    data = attack.poison(splits.train)
    poisoned = ImageSplit(data.images, data.labels)
    trig = attack.triggered_test(splits.test)

    def asr(model) -> float:
        with torch.no_grad():
            return float((model(to_float(trig.images)).argmax(1) == trig.attack_labels).float().mean())

    spec = {"name": "small_cnn", "width": 16}
    victim = train_clean_model(poisoned, 10, model=spec, epochs=12, lr=0.05, batch_size=64, seed=0)
    clean = train_clean_model(splits.train, 10, model=spec, epochs=12, lr=0.05, batch_size=64, seed=0)
    with torch.no_grad():
        ca = float((victim(to_float(splits.test.images)).argmax(1) == splits.test.labels).float().mean())
    assert ca > 0.7, ca  # crop and flip (train_clean_model) cost some accuracy on 16 px digits
    print(f"victim CA {ca:.3f} ASR {asr(victim):.3f}; clean model ASR {asr(clean):.3f}")
    assert asr(victim) > 0.5 and asr(victim) > asr(clean) + 0.3, (asr(victim), asr(clean))


def test_needs_poison_first(tmp_path):
    attack = make(tmp_path)
    assert attack.needs_fit and not attack.clean_label and attack.artefacts() == {}
    for call in (lambda: attack.apply(torch.rand(1, 3, 32, 32)), lambda: attack.triggered_test(None), lambda: attack.fit_accuracy):
        with pytest.raises(ConfigError, match="poison"):
            call()


def test_cache_and_seeds(digits32, tmp_path, monkeypatch):
    calls: list[int] = []
    real = Dynamic._train

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Dynamic, "_train", counted)
    tiny = {"surrogate_epochs": 1, "mask_epochs": 1, "rate": 0.05}
    a = make(tmp_path / "a", seed=1, **tiny).poison(digits32)
    b = make(tmp_path / "b", seed=1, **tiny).poison(digits32)  # fresh cache: same result
    assert len(calls) == 2 and torch.equal(a.images, b.images)
    c = make(tmp_path / "a", seed=2, **tiny).poison(digits32)  # only the selection changes
    assert len(calls) == 2 and not torch.equal(a.poison_mask, c.poison_mask)
    again = make(tmp_path / "a", seed=1, **tiny).poison(digits32)
    assert len(calls) == 2 and torch.equal(again.images, a.images)
    make(tmp_path / "a", seed=1, surrogate_seed=5, **tiny).poison(digits32)  # new generators
    assert len(calls) == 3
    assert [p.name.split("-")[0] for p in (tmp_path / "a" / "attacks").glob("*.safetensors")] == ["dynamic", "dynamic"]


def test_bad_params_name_their_key():
    for key, value in (
        ("mask_density", 0.0),
        ("mask_epochs", 0),
        ("p_attack", 1.0),
        ("p_cross", 0.0),
        ("lambda_div", -1.0),
        ("generator_lr", 0.0),
        ("generator_width", 0),
        ("surrogate_model", "nope"),
        ("surrogate_epochs", 0),
    ):
        with pytest.raises(ConfigError, match=f"attack.{key}"):
            ATTACKS.create({"name": "dynamic", key: value})
    with pytest.raises(ConfigError, match="attack.p_cross"):
        ATTACKS.create({"name": "dynamic", "p_attack": 0.6, "p_cross": 0.5})
    with pytest.raises(ConfigError, match="attack.surrogate_batch_size"):
        ATTACKS.create({"name": "dynamic", "surrogate_batch_size": 5})
    with pytest.raises(ConfigError, match="divisible by 8"):
        ATTACKS.create({"name": "dynamic"}).setup(28, 10)


# -- a fit killed part-way resumes (the slice's generator takes hours on a CPU) -------------
# six pattern epochs: the learning-rate milestones (1-5) fall on both sides of a resume
RESUME = {"surrogate_epochs": 6, "mask_epochs": 3, "rate": 0.05}


class Killed(Exception):
    """Stands in for a session's end in the middle of a fit."""


def _fit(cache_dir, data, monkeypatch=None, kill_at: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Fit the generators; with ``kill_at``, die right after the checkpoint of that epoch end
    (1-3: the mask stage, 4: the pattern stage's start, 5-10: its epochs). Returns the state
    and how many epochs this call trained."""
    from abl.attacks import surrogate

    epochs: list[int] = []
    real_batches = Dynamic._batches
    real_save = surrogate.FitCheckpoint.save
    saves: list[int] = []

    def batches(self, *args, **kwargs):
        epochs.append(1)
        return real_batches(self, *args, **kwargs)

    def save(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == kill_at:
            raise Killed

    assert monkeypatch is not None
    monkeypatch.setattr(Dynamic, "_batches", batches)
    monkeypatch.setattr(surrogate.FitCheckpoint, "save", save)
    monkeypatch.setattr(surrogate, "CHECKPOINT_SECONDS", 0.0)
    attack = make(cache_dir, seed=1, **RESUME)
    attack.fit(data)
    assert attack.state is not None
    return attack.state, len(epochs)


@pytest.mark.parametrize("kill_at", [1, 4, 5, 10])
def test_a_killed_fit_resumes_to_the_same_generators(digits32, tmp_path, monkeypatch, kill_at):
    whole, trained = _fit(tmp_path / "whole", digits32, monkeypatch)
    assert trained == 9  # 3 mask epochs + 6 pattern epochs
    assert not list((tmp_path / "whole" / "attacks").glob("*.partial.safetensors"))  # spent, removed

    with pytest.raises(Killed):
        _fit(tmp_path / "cut", digits32, monkeypatch, kill_at=kill_at)
    partial = list((tmp_path / "cut" / "attacks").glob("*.partial.safetensors"))
    finished = [p for p in (tmp_path / "cut" / "attacks").glob("dynamic-*.safetensors") if ".partial." not in p.name]
    assert len(partial) == 1 and finished == []

    resumed, trained = _fit(tmp_path / "cut", digits32, monkeypatch)
    done = {1: 1, 4: 3, 5: 4, 10: 9}[kill_at]  # epochs finished before the kill (10: all)
    assert trained == 9 - done
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    assert not partial[0].exists()


def test_an_unreadable_checkpoint_is_ignored(digits32, tmp_path, monkeypatch):
    whole, _ = _fit(tmp_path / "whole", digits32, monkeypatch)
    with pytest.raises(Killed):
        _fit(tmp_path / "cut", digits32, monkeypatch, kill_at=6)
    (partial,) = (tmp_path / "cut" / "attacks").glob("*.partial.safetensors")
    partial.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable fit checkpoint"):
        again, trained = _fit(tmp_path / "cut", digits32, monkeypatch)
    assert trained == 9 and all(torch.equal(again[k], whole[k]) for k in whole)

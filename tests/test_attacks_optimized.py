"""The optimisation-based attacks (``cl``, ``trojannn``) and their shared surrogate/cache.

Tiny settings throughout: 300 real digits images at 32x32, a 1-epoch ``small_cnn``
surrogate, a few optimisation steps, and a per-test cache directory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abl.attacks import ATTACKS, surrogate
from abl.data.loader import to_float
from abl.data.types import ImageSplit
from abl.errors import ConfigError

TINY = {"surrogate_model": "small_cnn", "surrogate_epochs": 1}


def make(name: str, cache_dir, **params):
    defaults = {"steps": 3} if name == "cl" else {"steps": 30, "lr": 0.1}
    attack = ATTACKS.create({"name": name, **TINY, **defaults, "cache_dir": str(cache_dir), **params})
    attack.setup(32, 10)
    return attack


# ------------------------------------------------------------------ shared helpers


def test_cached_tensors_builds_once_and_is_atomic(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.uint8)}

    key = {"x": 1, "data": "abc"}
    first = surrogate.cached_tensors("demo", key, build, tmp_path)
    second = surrogate.cached_tensors("demo", dict(reversed(list(key.items()))), build, tmp_path)
    assert len(calls) == 1 and torch.equal(first["a"], second["a"]) and second["b"].dtype == torch.uint8
    files = list((tmp_path / "attacks").glob("*.safetensors"))  # beside it: its lock file
    assert len(files) == 1 and files[0].name.startswith("demo-")
    surrogate.cached_tensors("demo", {"x": 2, "data": "abc"}, build, tmp_path)
    assert len(calls) == 2
    # a corrupt file is rebuilt, with a warning
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again = surrogate.cached_tensors("demo", key, build, tmp_path)
    assert len(calls) == 3 and torch.equal(again["a"], first["a"])


def test_processes_sharing_the_cache_build_an_artefact_once(tmp_path):
    """Two processes (two cells of a sweep) ask for the same artefact at once: the first
    builds it under the file's lock, the other waits and reads it."""
    import subprocess
    import sys

    code = (
        "import sys, time, torch\n"
        "from abl.attacks import surrogate\n"
        "def build():\n"
        "    open(sys.argv[1] + '/builds', 'a').write('x')\n"
        "    time.sleep(3)\n"
        "    return {'a': torch.arange(3.0)}\n"
        "out = surrogate.cached_tensors('demo', {'k': 1}, build, sys.argv[1])\n"
        "assert out['a'].tolist() == [0.0, 1.0, 2.0]\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert (tmp_path / "builds").read_text() == "x"


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ABL_CACHE_DIR", str(tmp_path))
    assert surrogate.cache_path("cl", {"a": 1}).parent == tmp_path / "attacks"


def test_data_fingerprint_sees_one_pixel(digits32):
    other = ImageSplit(digits32.images.clone(), digits32.labels.clone())
    assert surrogate.data_fingerprint(other) == surrogate.data_fingerprint(digits32)
    other.images[5, 0, 3, 3] ^= 1
    assert surrogate.data_fingerprint(other) != surrogate.data_fingerprint(digits32)


def test_train_clean_model_learns(digits32):
    model = surrogate.train_clean_model(digits32, 10, model={"name": "small_cnn"}, epochs=15, lr=0.05, batch_size=32, seed=0)
    assert not model.training
    with torch.no_grad():
        acc = (model(to_float(digits32.images)).argmax(1) == digits32.labels).float().mean()
    assert float(acc) > 0.5, "the clean surrogate should beat chance on its training data"


# ------------------------------------------------------------------ cl


def test_cl_clean_label_budget_and_trigger(digits32, tmp_path):
    eps = 8 / 255
    attack = make("cl", tmp_path, rate=0.05, rate_of="dataset", target=3, eps=eps)
    assert attack.clean_label
    data = attack.poison(digits32)
    m = data.poison_mask
    assert int(m.sum()) == round(0.05 * 300)
    assert data.images.dtype == torch.uint8 and data.images.shape == digits32.images.shape
    assert torch.equal(data.labels, digits32.labels) and bool((digits32.labels[m] == 3).all())
    assert torch.equal(data.images[~m], digits32.images[~m])
    diff = (data.images[m].int() - digits32.images[m].int()).abs()
    trig = attack.mask[0] > 0
    assert int(diff[:, :, ~trig].max()) <= eps * 255 + 1, "PGD must stay within eps outside the trigger"
    assert int(diff[:, :, ~trig].max()) > 0, "PGD must perturb the images"
    grid = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert bool((data.images[m][:, :, 29:, 29:] == grid).all())
    arts = attack.artefacts()
    assert torch.equal(arts["perturbed_indices"], m.nonzero().squeeze(1))
    assert arts["perturbed_images"].dtype == torch.uint8 and len(arts["perturbed_images"]) == int(m.sum())


def test_cl_apply_is_the_plain_trigger(tmp_path):
    attack = make("cl", tmp_path)
    x = torch.rand(4, 3, 32, 32)
    y = attack.apply(x.clone())  # no fit needed: the trigger is fixed
    assert y.shape == x.shape and y.dtype == x.dtype and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y[:, :, :29], x[:, :, :29]) and torch.equal(y[:, :, :, :29], x[:, :, :, :29])
    assert torch.equal(y[:, :, 29:, 29:], attack.pattern_image[:, 29:, 29:].expand(4, -1, -1, -1))
    trig = attack.triggered_test(ImageSplit((x * 255).to(torch.uint8), torch.arange(4)))
    assert len(trig) == 3


def test_cl_four_corners_and_amplitude(tmp_path):
    attack = make("cl", tmp_path, corners=4, amplitude=0.5)
    y = attack.apply(torch.zeros(1, 3, 32, 32))[0]
    for rows, cols in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(29, 32)), (slice(29, 32), slice(0, 3)), (slice(29, 32), slice(29, 32))):
        assert float(y[:, rows, cols].max()) == 0.5
    assert float(y[:, 3:29].abs().sum()) == 0 and float(y[:, :, 3:29].abs().sum()) == 0
    assert torch.equal(y[0, 29:, 29:] * 2, torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]]))


def test_cl_seed_determinism_and_cache(digits32, tmp_path, monkeypatch, surrogate_trainings):
    calls = surrogate_trainings
    a = make("cl", tmp_path / "a", seed=1, rate=0.05, rate_of="dataset").poison(digits32)
    b = make("cl", tmp_path / "b", seed=1, rate=0.05, rate_of="dataset").poison(digits32)  # fresh cache: recomputed
    assert len(calls) == 2
    assert torch.equal(a.images, b.images) and torch.equal(a.poison_mask, b.poison_mask)
    c = make("cl", tmp_path / "a", seed=2, rate=0.05, rate_of="dataset").poison(digits32)  # surrogate reused, new PGD set
    assert len(calls) == 2
    assert not torch.equal(a.poison_mask, c.poison_mask) and not torch.equal(a.images, c.images)
    again = make("cl", tmp_path / "a", seed=1, rate=0.05, rate_of="dataset").poison(digits32)
    assert len(calls) == 2 and torch.equal(again.images, a.images)
    # a different budget is a different cache entry, but the surrogate is shared
    make("cl", tmp_path / "a", seed=1, rate=0.05, rate_of="dataset", eps=4 / 255).poison(digits32)
    assert len(calls) == 2


def test_cl_bad_params_name_their_key():
    for key, value in (("eps", 1.5), ("steps", -1), ("step_size", 0.0), ("amplitude", 0.0), ("surrogate_model", "nope"), ("surrogate_epochs", 0), ("corners", 2)):
        with pytest.raises(ConfigError, match=f"attack.{key}"):
            ATTACKS.create({"name": "cl", key: value})
    with pytest.raises(ConfigError, match="attack.labelling"):
        ATTACKS.create({"name": "cl", "labelling": "all2all"})


# ------------------------------------------------------------------ trojannn


def test_trojannn_needs_poison_first(tmp_path):
    attack = make("trojannn", tmp_path)
    with pytest.raises(ConfigError, match="poison"):
        attack.triggered_test(ImageSplit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.arange(2)))
    with pytest.raises(ConfigError, match="poison"):
        attack.apply(torch.rand(1, 3, 32, 32))
    assert attack.artefacts() == {} and attack.needs_fit


def test_trojannn_poison_and_trigger(digits32, tmp_path):
    attack = make("trojannn", tmp_path, rate=0.1, target=2, neurons=2, steps=60)
    data = attack.poison(digits32)
    m = data.poison_mask
    assert int(m.sum()) == 30 and bool((data.labels[m] == 2).all()) and bool((data.true_labels[m] != 2).all())
    assert torch.equal(data.images[~m], digits32.images[~m]) and torch.equal(data.labels[~m], digits32.labels[~m])
    arts = attack.artefacts()
    assert set(arts) == {"mask", "pattern", "neurons"} and arts["neurons"].shape == (2,)
    assert float(arts["mask"].sum()) == 25 and float(arts["mask"][0, 27:, 27:].sum()) == 25
    # apply: only the masked pixels change, values stay in [0, 1]
    x = torch.rand(5, 3, 32, 32)
    y = attack.apply(x.clone())
    assert y.shape == x.shape and y.dtype == x.dtype and float(y.min()) >= 0 and float(y.max()) <= 1
    outside = arts["mask"][0] == 0
    assert torch.equal(y[:, :, outside], x[:, :, outside]) and not torch.equal(y, x)
    # the optimisation excited the chosen neurons
    model = attack.surrogate
    assert model is not None
    clean = to_float(digits32.images[:100])
    with torch.no_grad():
        before = attack.activation(model, clean, arts["neurons"]).mean()
        after = attack.activation(model, attack.apply(clean), arts["neurons"]).mean()
        gen = torch.Generator().manual_seed(0)
        random_trigger = torch.lerp(clean, torch.rand(3, 32, 32, generator=gen), arts["mask"])
        unoptimised = attack.activation(model, random_trigger, arts["neurons"]).mean()
    # (a 1-epoch surrogate and a 5x5 patch: the gain is bounded, so compare ratios)
    assert float(after) > 1.2 * float(before) and float(after) > 1.5 * float(unoptimised), (before, after, unoptimised)
    trig = attack.triggered_test(digits32.subset(torch.arange(50)))
    assert len(trig) == int((digits32.labels[:50] != 2).sum()) and bool((trig.attack_labels == 2).all())


def test_trojannn_seed_determinism_and_cache(digits32, tmp_path, monkeypatch, surrogate_trainings):
    calls = surrogate_trainings
    a = make("trojannn", tmp_path / "a", seed=1, rate=0.05)
    pa = a.poison(digits32)
    b = make("trojannn", tmp_path / "b", seed=1, rate=0.05)
    pb = b.poison(digits32)
    assert len(calls) == 2 and torch.equal(pa.images, pb.images) and torch.equal(a.artefacts()["pattern"], b.artefacts()["pattern"])
    # `seed` picks the poisoned examples only: the trigger is shared (from the cache)
    c = make("trojannn", tmp_path / "a", seed=2, rate=0.05)
    pc = c.poison(digits32)
    assert len(calls) == 2 and not torch.equal(pa.poison_mask, pc.poison_mask)
    assert torch.equal(a.artefacts()["pattern"], c.artefacts()["pattern"]) and c.surrogate is None
    # `surrogate_seed` seeds the attacker's preparation: a new surrogate and trigger
    d = make("trojannn", tmp_path / "a", seed=1, rate=0.05, surrogate_seed=3)
    d.poison(digits32)
    assert len(calls) == 3 and not torch.equal(a.artefacts()["pattern"], d.artefacts()["pattern"])

    def boom(*args, **kwargs):
        raise AssertionError("the surrogate should come from the cache")

    monkeypatch.setattr(surrogate, "train_clean_model", boom)
    again = make("trojannn", tmp_path / "a", seed=1, rate=0.05)
    assert torch.equal(again.poison(digits32).images, pa.images)
    assert again.surrogate is None, "a cached trigger needs no surrogate"


def test_trojannn_features_layer_and_all2all(digits32, tmp_path):
    attack = make("trojannn", tmp_path, layer="features", labelling="all2all", rate=0.1, steps=5)
    data = attack.poison(digits32)
    m = data.poison_mask
    assert torch.equal(data.labels[m], (digits32.labels[m] + 1) % 10)


def test_trojannn_mask_file(digits32, tmp_path):
    shape = np.zeros((32, 32), dtype=np.uint8)
    shape[2:6, 10:20] = 255  # a bar-shaped "watermark"
    path = tmp_path / "wm.npy"
    np.save(path, shape)
    attack = make("trojannn", tmp_path, mask="file", mask_file=str(path), steps=5)
    attack.poison(digits32)
    assert torch.equal(attack.artefacts()["mask"][0] > 0, torch.from_numpy(shape > 0))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ConfigError, match="attack.mask_file"):
        make("trojannn", tmp_path, mask="file", mask_file=str(empty))


def test_trojannn_bad_params_name_their_key():
    for key, value in (("size", 0), ("neurons", 0), ("target_activation", -1.0), ("steps", 0), ("lr", 0.0), ("layer", "conv1"), ("mask", "circle"), ("surrogate_lr", 0.0)):
        with pytest.raises(ConfigError, match=f"attack.{key}"):
            ATTACKS.create({"name": "trojannn", key: value})
    with pytest.raises(ConfigError, match="attack.mask_file"):
        ATTACKS.create({"name": "trojannn", "mask": "file"})
    with pytest.raises(ConfigError, match="attack.size"):
        ATTACKS.create({"name": "trojannn", "size": 40}).setup(32, 10)

"""The model zoo: a contract every registered model keeps, and per-model facts.

Contract tests are parametrised over ``MODELS.names()``, so a model registered later is
checked without editing this file (add its extra input sizes to ``EXTRA_SIZES``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from abl.config import to_plain
from abl.errors import ConfigError, UnknownComponentError
from abl.models import MODELS

NAMES = MODELS.names()
# Behavioural tests (gradients, channels_last, batch independence, compile) use small
# images to stay cheap on a CPU; the shapes test covers 32 px and the sizes below.
SMALL = 16
# Input sizes each model is also checked at, beyond 32 (all at batch 2, to stay cheap).
EXTRA_SIZES = {"small_cnn": (16,), "resnet18": (64, 224), "resnet34": (64, 224)}


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread: these are small ops, and on an oversubscribed
    machine OpenMP barrier stalls were seen to slow the digits test 20x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, num_classes: int = 10, image_size: int = 32, **params) -> nn.Module:
    return MODELS.create({"name": name, **params}).build(num_classes, image_size)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def shape_cases():
    for name in NAMES:
        for num_classes in (10, 43):
            yield pytest.param(name, num_classes, 32, id=f"{name}-{num_classes}c-32px")
        for size in EXTRA_SIZES.get(name, ()):
            yield pytest.param(name, 10, size, id=f"{name}-10c-{size}px")


def test_expected_models_are_registered():
    assert {"wrn", "resnet18", "resnet34", "preact_resnet18", "small_cnn"} <= set(NAMES)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize(("name", "num_classes", "size"), list(shape_cases()))
def test_output_shape_dtype_and_features(name, num_classes, size):
    torch.manual_seed(0)
    model = build(name, num_classes, size).eval()
    n = 2
    x = images(n, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        maps = model.feature_maps(x)
    assert logits.shape == (n, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert isinstance(model.fc, nn.Linear)
    assert model.fc.out_features == num_classes
    assert feats.shape == (n, model.fc.in_features)
    assert maps.shape[:2] == (n, model.fc.in_features) and maps.dim() == 4
    torch.testing.assert_close(model.fc(feats), logits)
    torch.testing.assert_close(maps.mean(dim=(2, 3)), feats)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last(name):
    torch.manual_seed(0)
    model = build(name, image_size=SMALL).eval()
    x = images(3, SMALL)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.train()
    loss = model(x.contiguous(memory_format=torch.channels_last)).sum()
    loss.backward()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build(name, image_size=SMALL).train()
    x = images(4, SMALL)
    y = torch.tensor([0, 1, 2, 3])
    logits = model(x)
    # Train-mode batch norm uses the batch's statistics: still a pure function of x.
    with torch.no_grad():
        torch.testing.assert_close(model.fc(model.features(x)), logits)
    F.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights(name):
    torch.manual_seed(123)
    a = build(name).state_dict()
    torch.manual_seed(123)
    b = build(name).state_dict()
    torch.manual_seed(124)
    c = build(name).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_independent_of_rest_of_batch(name):
    torch.manual_seed(0)
    model = build(name, image_size=SMALL).eval()
    x = images(4, SMALL)
    other = images(4, SMALL, seed=1)
    with torch.no_grad():
        full = model(x)
        mixed = model(torch.cat([x[:2], other[2:]]))
        for i in (0, 3):
            torch.testing.assert_close(model(x[i : i + 1]), full[i : i + 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[:2], full[:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_traces_as_one_graph_under_torch_compile(name):
    # aot_eager traces forward and backward through dynamo + AOTAutograd without the
    # (slow) inductor code generation; fullgraph=True fails on any graph break.
    torch._dynamo.reset()  # the shared forward code object would hit the recompile limit
    torch.manual_seed(0)
    model = build(name, image_size=SMALL).train()
    x = images(2, SMALL)
    with torch.no_grad():
        expected = model(x)  # train mode: batch statistics, so the same output again
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_inductor_compile_channels_last_train_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build("small_cnn", image_size=16).to(memory_format=torch.channels_last)
    x = images(8, 16).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    F.cross_entropy(out, torch.arange(8)).backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_build_rejects_bad_sizes(name):
    spec = MODELS.create(name)
    with pytest.raises(ValueError):
        spec.build(0, 32)
    with pytest.raises(ValueError):
        spec.build(10, 0)


@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trips_through_plain_config(name):
    spec = MODELS.create(name)
    plain = to_plain(spec)
    assert plain["name"] == name
    assert MODELS.create(plain) == spec


# --------------------------------------------------------------------------- per model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wrn_16_1_has_about_175k_parameters():
    # The ABL paper's WRN-16-1; the reference implementation has 175,066 at 10 classes.
    count = n_params(build("wrn", depth=16, widen=1))
    assert abs(count - 175_000) / 175_000 < 0.02
    assert count == 175_066


def test_wrn_28_10_matches_the_paper():
    # Zagoruyko & Komodakis report 36.5M parameters for WRN-28-10 on CIFAR-10.
    assert abs(n_params(build("wrn", depth=28, widen=10)) - 36.5e6) / 36.5e6 < 0.01


def test_resnet_parameter_counts():
    # CIFAR stem: the widely used 11,173,962 / 21,282,122; ImageNet stem: torchvision's
    # resnet18 / resnet34 with a 10-class head.
    assert n_params(build("resnet18", image_size=32)) == 11_173_962
    assert n_params(build("resnet34", image_size=32)) == 21_282_122
    assert n_params(build("resnet18", image_size=224)) == 11_181_642
    assert n_params(build("resnet34", image_size=224)) == 21_289_802


@pytest.mark.parametrize(
    ("stem", "size", "first_kernel", "has_maxpool", "map_size"),
    [
        ("auto", 32, 3, False, 4),
        ("auto", 64, 3, False, 8),
        ("auto", 224, 7, True, 7),
        ("cifar", 224, 3, False, 28),
        ("imagenet", 32, 7, True, 1),
    ],
)
def test_resnet_stem(stem, size, first_kernel, has_maxpool, map_size):
    model = build("resnet18", image_size=size, stem=stem).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (first_kernel, first_kernel)
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules()) == has_maxpool
    with torch.no_grad():
        assert model.feature_maps(images(1, size)).shape == (1, 512, map_size, map_size)


def test_wrn_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = build("wrn", dropout=0.3)
    x = images(2, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_init_is_kaiming_and_unit_batchnorm():
    torch.manual_seed(0)
    model = build("resnet18")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.1 * (2 / fan_out) ** 0.5
    assert torch.all(model.fc.bias == 0)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("depth", [15, 8, 4, 0, -2])
def test_wrn_bad_depth_names_the_key(depth):
    with pytest.raises(ConfigError, match=r"model\.depth"):
        MODELS.create({"name": "wrn", "depth": depth})


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"widen": 0}, "model.widen"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"dropout": -0.1}, "model.dropout"),
        ({"depth": "16"}, "model.depth"),
        ({"widen": 1.5}, "model.widen"),
    ],
)
def test_wrn_bad_values_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MODELS.create({"name": "wrn", **params})


def test_unknown_param_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.depht"):
        MODELS.create({"name": "wrn", "depht": 16})
    with pytest.raises(ConfigError, match=r"model\.depth"):
        MODELS.create({"name": "resnet18", "depth": 18})


def test_bad_stem_and_width_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.stem"):
        MODELS.create({"name": "resnet34", "stem": "tiny"})
    with pytest.raises(ConfigError, match=r"model\.width"):
        MODELS.create({"name": "small_cnn", "width": 0})


def test_unknown_model_lists_the_known_names():
    with pytest.raises(UnknownComponentError) as info:
        MODELS.create({"name": "vgg16"})
    message = str(info.value)
    assert "vgg16" in message
    for name in NAMES:
        assert name in message


# --------------------------------------------------------------------------- small_cnn learns


def test_small_cnn_learns_sklearn_digits():
    """>95% held-out accuracy on 16x16 sklearn digits after 10 quick epochs (~2-3 s)."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    x = x.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(0)
    model = build("small_cnn", image_size=16)
    epochs, batch = 10, 64
    steps = epochs * -(-len(train) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95

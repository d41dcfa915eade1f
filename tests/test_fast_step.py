"""The planned-epoch training step (``train.fast_step``) against the plain loop.

On the CPU the fast path runs its step function eagerly, so these tests pin down what a
CUDA graph of it replays: the same batches, pixels, losses, records and RNG states as the
loop over the loader, for every objective and BatchNorm mode, and no host sync inside an
epoch (a sync would stall the GPU at every step and cannot be captured).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.data.loader import AugmentConfig, TensorLoader
from abl.defenses.abl import flooding_objective, gga_objective, lga_batch_objective, lga_objective
from abl.engine import Engine, TrainConfig, mean_loss
from abl.errors import ConfigError
from abl.models import MODELS

N_SLICE = 300  # with batch 64: four full batches and a partial one of 44


@pytest.fixture(scope="module")
def digits_poisoned():
    torch.set_num_threads(1)
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1, "target": 0})
    attack.setup(splits.image_size, splits.num_classes)
    return splits, attack.poison(splits.train), attack.triggered_test(splits.test)


def _isolated(n: int) -> torch.Tensor:
    lookup = torch.zeros(n, dtype=torch.bool)
    lookup[torch.arange(3, n, 41)] = True
    return lookup


SCENARIOS = ["ce", "ce_authors_cutout", "lga", "lga_batch", "flooding", "gga_paired", "ascent",
             "smoothing_per_example", "smoothing_scalar"]


def _scenarios(n: int) -> dict[str, dict]:
    iso = _isolated(n)
    iso_idx = iso.nonzero().squeeze(1)
    aug = AugmentConfig()
    out = {
        "ce": dict(lr=0.05, augment=aug),
        "ce_authors_cutout": dict(lr=0.05, augment=AugmentConfig(cutout=3, cutout_span="authors"), freeze_bn="stats"),
        "lga": dict(lr=0.05, objective=lga_objective(0.5)),
        "lga_batch": dict(lr=0.05, objective=lga_batch_objective(0.5), freeze_bn=True),
        "flooding": dict(lr=0.05, objective=flooding_objective(0.3), augment=aug),
        "gga_paired": dict(lr=0.01, objective=gga_objective(iso, 5.0), paired=iso_idx, paired_batch_size=10,
                           augment=aug, freeze_bn="stats"),
        "ascent": dict(lr=0.001, objective=gga_objective(iso), index=iso_idx, batch_size=16, freeze_bn=True),
        "smoothing_per_example": dict(lr=0.05, smoothing=torch.linspace(0, 0.3, n)),
        "smoothing_scalar": dict(lr=0.05, smoothing=0.1, augment=aug),
    }
    assert list(out) == SCENARIOS
    return out


def _run(digits_poisoned, fast: str, scenario: str) -> dict:
    """Train two epochs (an lr milestone after the first) of ``scenario``; return what
    each step saw and what the engine recorded."""
    splits, data, trig = digits_poisoned
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn"}).build(10, splits.image_size)
    cfg = TrainConfig(progress=False, batch_size=64, eval_subset=100, checkpoint_every_s=0, fast_step=fast)
    engine = Engine(model, data, splits.test, trig, cfg, seed=5)
    kw = dict(_scenarios(len(data))[scenario])
    kw.setdefault("index", torch.arange(0, len(data), 3)[:N_SLICE])
    inner = kw.pop("objective", mean_loss)
    steps: list[tuple[torch.Tensor, ...]] = []
    images: list[torch.Tensor] = []

    def objective(losses, idx):
        loss = inner(losses, idx)
        steps.append((idx.clone(), losses.detach().clone(), loss.detach().clone()))
        return loss

    model.register_forward_pre_hook(lambda m, inputs: images.append(inputs[0].clone()) if m.training else None)
    states: list[dict] = []
    engine.enable_checkpoints(lambda st: states.append({"loader": st["loader"]["generator"].clone(),
                                                         "paired_pos": st["loader"]["paired_pos"],
                                                         "rng": st["rng"]["cpu"].clone()}))
    engine.run_phase("p", epochs=2, milestones=[1], objective=objective, **kw)
    hist = [{k: v for k, v in h.items() if k != "time_s"} for h in engine.history]
    return {"steps": steps, "images": images, "losses": engine.loss_matrix().clone(), "history": hist,
            "states": states, "rng": torch.get_rng_state(), "params": [p.detach().clone() for p in model.parameters()]}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaNs in the same places counting as equal."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fast_step_matches_the_plain_loop(digits_poisoned, scenario):
    plain, fast = _run(digits_poisoned, "off", scenario), _run(digits_poisoned, "on", scenario)
    sizes = [len(s[0]) for s in plain["steps"]]
    assert len(set(sizes)) == 2, f"the slice must end in a partial batch, got batch sizes {sizes}"
    assert len(plain["steps"]) == len(fast["steps"])
    for i, (p, f) in enumerate(zip(plain["steps"], fast["steps"])):
        assert torch.equal(p[0], f[0]), f"step {i}: batch indices differ"
        assert _same(p[1], f[1]) and _same(p[2], f[2]), f"step {i}: losses differ"
    assert len(plain["images"]) == len(fast["images"])
    assert all(torch.equal(p, f) for p, f in zip(plain["images"], fast["images"])), "augmented images differ"
    assert _same(plain["losses"], fast["losses"]) and bool(plain["losses"].isnan().any()), "loss matrix (NaN included)"
    assert plain["history"] == fast["history"]
    assert plain["history"][1]["lr"] < plain["history"][0]["lr"], "the milestone must move the lr"
    assert len(plain["states"]) == len(fast["states"]) == 2
    for p, f in zip(plain["states"], fast["states"]):
        assert torch.equal(p["loader"], f["loader"]) and p["paired_pos"] == f["paired_pos"], "loader RNG state"
        assert torch.equal(p["rng"], f["rng"]), "global RNG state"
    assert torch.equal(plain["rng"], fast["rng"])
    assert all(torch.equal(p, f) for p, f in zip(plain["params"], fast["params"]))


def test_plan_draws_what_iteration_draws_across_paired_wraps(digits_poisoned):
    _, data, _ = digits_poisoned
    iso = _isolated(len(data)).nonzero().squeeze(1)

    def loader():
        return TensorLoader(data.images, data.labels, 32, index=torch.arange(200), augment=AugmentConfig(),
                            seed=7, paired=iso, paired_batch_size=10)

    a, b = loader(), loader()
    for _ in range(3):  # 7 batches x 10 paired of 33: the stream wraps mid-batch
        planned = b.plan()
        iterated = list(a)
        assert len(planned) == len(iterated) == 7
        for (x, y, idx), (pidx, draw) in zip(iterated, planned):
            assert torch.equal(idx, pidx) and torch.equal(x, b.batch(pidx, draw)) and torch.equal(y, b.labels[pidx])
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
        assert torch.equal(a._paired_order, b._paired_order) and a._paired_pos == b._paired_pos


#: ops that make the host wait for the device: reading a value, or an output whose size
#: depends on the data (boolean-mask indexing runs ``nonzero`` on a GPU)
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
             "aten::is_nonzero", "aten::equal", "aten::unique_dim", "aten::_unique2"}


class NoHostSync(TorchDispatchMode):
    """Raises on any op that would stop the host to wait for the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _SYNC_OPS:
            raise AssertionError(f"host sync: {func}")
        if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                raise AssertionError(f"host sync: boolean-mask {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("scenario", ["gga_paired", "smoothing_per_example", "ce_authors_cutout"])
def test_no_host_sync_inside_an_epoch(digits_poisoned, scenario, monkeypatch):
    splits, data, trig = digits_poisoned
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn"}).build(10, splits.image_size)
    engine = Engine(model, data, splits.test, trig, TrainConfig(progress=False, batch_size=64, eval_every=0,
                                                                fast_step="on"), seed=5)
    epochs = []
    planned = engine._planned_epoch

    def guarded(*args, **kwargs):  # the whole epoch: its plan, every gather, step and record
        with NoHostSync():
            steps = planned(*args, **kwargs)
        epochs.append(steps)
        return steps

    monkeypatch.setattr(engine, "_planned_epoch", guarded)
    kw = dict(_scenarios(len(data))[scenario])
    kw.setdefault("index", torch.arange(0, len(data), 3)[:N_SLICE])
    if "paired" in kw:  # the stream must wrap inside a batch, where a sync used to hide
        assert len(kw["paired"]) % kw["paired_batch_size"]
    engine.run_phase("p", epochs=2, **kw)
    assert len(epochs) == 2 and all(s >= 5 for s in epochs), "the guarded epochs must have run"


def test_no_host_sync_detector_sees_one():
    a = torch.arange(6.0)
    for sync in (lambda: a.sum().item(), lambda: a[a > 2], lambda: float(a[0]), lambda: a.nonzero()):
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            sync()


def test_fast_step_option_is_checked():
    with pytest.raises(ConfigError, match="train.fast_step"):
        TrainConfig(fast_step="fast").validate()


def test_capture_and_replay_logic_matches_the_plain_loop(digits_poisoned, monkeypatch):
    """The CUDA branch of the fast path, on the CPU: a stand-in "graph" records the step
    function at capture and calls it again on replay with the inputs copied into its own
    tensors, as a CUDA graph reads them. Results stay bit-identical to the plain loop, and
    the lr milestone forces a new capture (a graph freezes the lr it was captured with)."""
    import abl.engine as engine_mod

    captures, replays = [], []

    class StandIn(engine_mod._CapturedStep):
        def _capture(self, fn):
            captures.append(len(self.idx))
            def replay():
                replays.append(len(self.idx))
                fn(self.idx, self.draw)
            return SimpleNamespace(replay=replay)

    monkeypatch.setattr(engine_mod, "_CapturedStep", StandIn)
    monkeypatch.setattr(Engine, "_graphable", lambda self, spec: spec.extra_loss is None)
    monkeypatch.setattr(Engine, "_warm_up", lambda self, run: run())
    for scenario in ("ce", "gga_paired"):
        captures.clear()
        replays.clear()
        plain, fast = _run(digits_poisoned, "off", scenario), _run(digits_poisoned, "on", scenario)
        # 5 batches an epoch (4 full): epoch 1 warms up twice (before and after the momentum
        # buffers exist), captures and replays 2; epoch 2 (new lr) warms once, replays 3
        assert len(captures) == 2 and len(replays) == 5, (captures, replays)
        assert all(torch.equal(p[0], f[0]) and _same(p[1], f[1]) for p, f in zip(plain["steps"], fast["steps"]))
        assert all(torch.equal(p, f) for p, f in zip(plain["images"], fast["images"]))
        assert _same(plain["losses"], fast["losses"]) and plain["history"] == fast["history"]
        assert all(torch.equal(p, f) for p, f in zip(plain["params"], fast["params"]))

"""The training engine: per-example loss record, schedules, divergence, evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.data.loader import AugmentConfig, to_float
from abl.defenses.abl import flooding_objective, gga_objective, lga_batch_objective, lga_objective
from abl.engine import Engine, TrainConfig, step_lr
from abl.errors import DivergenceError
from abl.models import MODELS


@pytest.fixture(scope="module")
def digits_poisoned():
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1, "target": 0})
    attack.setup(splits.image_size, splits.num_classes)
    return splits, attack.poison(splits.train), attack.triggered_test(splits.test)


def make_engine(digits_poisoned, **cfg):
    splits, data, trig = digits_poisoned
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn"}).build(10, splits.image_size)
    config = TrainConfig(**{"progress": False, "batch_size": 64, "eval_subset": 0, **cfg})
    return Engine(model, data, splits.test, trig, config, seed=0)


def test_step_lr():
    assert step_lr(0.1, 0, [20, 70], 0.1) == 0.1
    assert math.isclose(step_lr(0.1, 20, [20, 70], 0.1), 0.01)
    assert math.isclose(step_lr(0.1, 75, [20, 70], 0.1), 0.001)


def test_records_every_example_every_epoch_and_learns(digits_poisoned):
    engine = make_engine(digits_poisoned)
    subset = torch.arange(0, len(engine.data), 2)
    engine.run_phase("a", epochs=2, lr=0.05, index=subset)
    engine.run_phase("b", epochs=3, lr=0.05, milestones=[1])
    losses = engine.loss_matrix()
    assert losses.shape == (5, len(engine.data))
    assert bool(losses[:2, subset].isfinite().all()) and bool(losses[:2, 1::2].isnan().all())
    assert bool(losses[2:].isfinite().all())
    hist = engine.history
    assert [h["phase"] for h in hist] == ["a", "a", "b", "b", "b"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3, 4]
    assert hist[2]["lr"] == 0.05 and math.isclose(hist[3]["lr"], 0.005)
    assert hist[-1]["clean_acc"] > 0.8, "small_cnn must learn digits in 5 epochs"
    assert hist[-1]["asr"] > 0.8, "BadNets at 10% must be learned"
    # the backdoor is learned faster than clean examples (the paper's Figure 6)
    assert hist[1]["poison_loss"] < hist[1]["clean_loss"]


def test_recorded_losses_come_from_the_batches(digits_poisoned):
    engine = make_engine(digits_poisoned)
    engine.run_phase("a", epochs=1, lr=0.0 + 1e-12)  # lr ~ 0: the model barely moves
    recorded = engine.loss_matrix()[0]
    # train-mode BN uses batch statistics, so compare loosely against an eval-mode pass
    evaluated = engine.per_example_loss().cpu()
    assert torch.corrcoef(torch.stack([recorded, evaluated]))[0, 1] > 0.5


def test_divergence_stops_with_a_message(digits_poisoned):
    engine = make_engine(digits_poisoned)

    def explode(losses, idx):
        return -losses.mean() * 1e30

    with pytest.raises(DivergenceError, match="phase 'ascent' diverged"):
        engine.run_phase("ascent", epochs=5, lr=1e10, objective=explode)


def test_eval_subset_and_full(digits_poisoned):
    engine = make_engine(digits_poisoned, eval_subset=50)
    sub = engine.evaluate(full=False)
    full = engine.evaluate(full=True)
    assert set(sub) == set(full) == {"clean_acc", "clean_acc_nontarget", "asr", "robust_acc"}  # all-to-one BadNets
    assert engine._eval_index is not None and len(engine._eval_index) == 50


def test_per_example_loss_is_eval_mode_and_unaugmented(digits_poisoned):
    engine = make_engine(digits_poisoned, eval_batch_size=100)  # several ranking batches
    engine.run_phase("a", epochs=1, lr=0.05, augment=AugmentConfig())  # BN running stats != batch stats
    model, data = engine.model, engine.data
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = to_float(data.images)
    with torch.no_grad():
        # on copies: a train-mode forward moves the running statistics
        expected = F.cross_entropy(copy.deepcopy(model).eval()(x), data.labels, reduction="none")
        train_mode = F.cross_entropy(copy.deepcopy(model).train()(x), data.labels, reduction="none")
    assert not torch.allclose(train_mode, expected, atol=1e-3), "the check must tell the modes apart"
    assert not torch.allclose(engine.loss_matrix()[-1], expected, atol=1e-3), "nor the batch losses"

    ranked = engine.per_example_loss()
    assert ranked.dtype == torch.float32 and torch.allclose(ranked.cpu(), expected, atol=1e-5)
    idx = torch.tensor([5, 0, 999, 17])
    assert torch.allclose(engine.per_example_loss(idx).cpu(), expected[idx], atol=1e-5)
    assert all(m.training for m in model.modules()), "ranking must leave the model in train mode"


def _count_eval_images(engine) -> list[int]:
    """Sizes of the eval-mode forward passes the engine's model sees from now on."""
    seen: list[int] = []

    def hook(module, inputs):
        if not module.training:
            seen.append(int(inputs[0].shape[0]))

    engine.model.register_forward_pre_hook(hook)
    return seen


def test_per_epoch_evaluation_uses_the_fixed_subset(digits_poisoned):
    engine = make_engine(digits_poisoned, eval_subset=50, eval_every=1)
    n_test, n_trig = len(engine.test), len(engine.triggered)
    assert n_test > 50 and n_trig > 50
    seen = _count_eval_images(engine)
    engine.evaluate(full=False)
    assert sum(seen) == 100, "50 clean and 50 triggered test images"
    seen.clear()
    engine.evaluate(full=True)
    assert sum(seen) == n_test + n_trig

    # inside training: subsets every epoch, the whole test sets at the phase's last one
    per_epoch: list[int] = []

    def after(e: int) -> None:
        per_epoch.append(sum(seen))
        seen.clear()

    seen.clear()
    engine.run_phase("a", epochs=3, lr=0.01, after_epoch=after)
    assert per_epoch == [100, 100, n_test + n_trig]

    # the subset is fixed: the same images, so the same metrics, at every call
    first, again = engine.evaluate(full=False), engine.evaluate(full=False)
    assert first == again


def test_isolation_objectives_values():
    losses = torch.tensor([0.1, 0.4, 1.0, 2.0], requires_grad=True)
    idx = torch.arange(4)
    assert math.isclose(float(lga_objective(0.5)(losses, idx).detach()), (-0.1 - 0.4 + 1.0 + 2.0) / 4, rel_tol=1e-6)
    mean = 3.5 / 4
    assert math.isclose(float(lga_batch_objective(0.5)(losses, idx).detach()), mean, rel_tol=1e-6)
    assert math.isclose(float(flooding_objective(0.5)(losses, idx).detach()), abs(mean - 0.5) + 0.5, rel_tol=1e-6)
    lookup = torch.tensor([True, False, False, True])
    assert math.isclose(float(gga_objective(lookup)(losses, idx).detach()), (1.4 / 2) - (2.1 / 2), rel_tol=1e-6)
    # per-example LGA pushes an example below gamma up, one above it down
    lga_objective(0.5)(losses, idx).backward()
    assert losses.grad[0] < 0 and losses.grad[3] > 0


def test_smoothed_cross_entropy_matches_torch_and_takes_one_value_per_example():
    from abl.engine import smoothed_cross_entropy

    torch.manual_seed(0)
    logits, y = torch.randn(32, 10) * 3, torch.randint(0, 10, (32,))
    for eps in (0.0, 0.2, 0.4):
        want = F.cross_entropy(logits, y, label_smoothing=eps, reduction="none")
        assert torch.allclose(smoothed_cross_entropy(logits, y, eps), want, atol=1e-6)
    per = torch.where(torch.arange(32) < 16, 0.4, 0.0)
    got = smoothed_cross_entropy(logits, y, per)
    assert torch.allclose(got[:16], F.cross_entropy(logits[:16], y[:16], label_smoothing=0.4, reduction="none"), atol=1e-6)
    assert torch.allclose(got[16:], F.cross_entropy(logits[16:], y[16:], reduction="none"), atol=1e-6)


def test_phase_smoothing_changes_the_objective_not_the_loss_record(digits_poisoned):
    records = []
    for smoothing in (0.0, 0.3, "per-example"):
        engine = make_engine(digits_poisoned, eval_every=0)
        eps = torch.full((len(engine.data),), 0.3) if smoothing == "per-example" else smoothing
        seen = []
        engine.run_phase("p", epochs=1, lr=1e-9, smoothing=eps, objective=lambda l, i: seen.append(l.detach()) or l.mean())
        records.append((torch.cat(seen), engine.loss_matrix()[0]))
    assert torch.allclose(records[0][1], records[1][1]), "the loss record is plain cross-entropy"
    assert not torch.allclose(records[0][0], records[1][0]), "the objective sees the smoothed loss"
    assert torch.allclose(records[1][0], records[2][0]), "one value or one per example: the same"


def test_the_plain_loss_of_the_smoothing_pass_is_torchs_cross_entropy_bit_for_bit():
    from abl.engine import _smoothed_and_plain

    torch.manual_seed(1)
    logits, y = torch.randn(64, 10) * 4, torch.randint(0, 10, (64,))
    smoothed, plain = _smoothed_and_plain(logits, y, 0.3)
    assert torch.equal(plain, F.cross_entropy(logits, y, reduction="none"))
    assert torch.allclose(smoothed, F.cross_entropy(logits, y, label_smoothing=0.3, reduction="none"), atol=1e-6)


def test_checkpoints_get_the_loss_record_without_copying_it(digits_poisoned):
    """The record grows in a buffer reserved a phase at a time: each checkpoint (here one
    per epoch) is handed a view of it, never a re-stacked copy of every epoch so far."""
    engine = make_engine(digits_poisoned, eval_every=0, checkpoint_every_s=0)
    written = []
    engine.enable_checkpoints(lambda st: written.append(st["example_losses"]))
    subset = torch.arange(0, len(engine.data), 2)
    engine.run_phase("a", epochs=3, lr=0.05, index=subset)
    engine.run_phase("b", epochs=2, lr=0.05)
    assert [len(w) for w in written] == [1, 2, 3, 4, 5]
    final = engine.loss_matrix()
    assert final.shape == (5, len(engine.data))
    phase_a = written[:3]
    assert len({w.untyped_storage().data_ptr() for w in phase_a}) == 1, "one buffer within a phase"
    assert phase_a[0].untyped_storage().data_ptr() == phase_a[2].untyped_storage().data_ptr()
    assert all(torch.equal(w.nan_to_num(-1), final[: len(w)].nan_to_num(-1)) for w in written), "earlier rows never change"
    assert bool(final[:3, 1::2].isnan().all()) and bool(final[3:].isfinite().all())
    assert [t.shape for t in engine.example_losses] == [(len(engine.data),)] * 5

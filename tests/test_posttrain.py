"""Post-training defenses (issue 10): the defender's clean subset, and fine-pruning on a
backdoored small CNN (digits, BadNets 10% to class 0)."""

from __future__ import annotations

import copy

import pytest
import torch

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.data.types import PoisonedSet
from abl.defenses import DEFENSES
from abl.defenses.posttrain import defender_clean_subset
from abl.detectors import extract_features
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.models import MODELS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backdoored():
    """A small CNN that learned BadNets on the digits, and its data (~8 s)."""
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1, "target": 0})
    attack.setup(splits.image_size, splits.num_classes)
    data, trig = attack.poison(splits.train), attack.triggered_test(splits.test)
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
    engine = Engine(model, data, splits.test, trig, TrainConfig(progress=False, eval_every=0, checkpoint=False, batch_size=64))
    engine.run_phase("backdoor", epochs=10, lr=0.05, milestones=[8])
    assert engine.history[-1]["asr"] > 0.9
    return splits, data, trig, {k: v.clone() for k, v in model.state_dict().items()}


def engine_from(backdoored, data: PoisonedSet | None = None) -> Engine:
    splits, poisoned, trig, weights = backdoored
    model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
    model.load_state_dict(weights)
    cfg = TrainConfig(progress=False, eval_every=0, checkpoint=False, batch_size=64)
    return Engine(model, data or poisoned, splits.test, trig, cfg, seed=0)


def test_the_clean_subset_is_seeded_unpoisoned_and_sized(backdoored):
    data = backdoored[1]
    sub = defender_clean_subset(data, 0.05, seed=0)
    assert len(sub) == round(0.05 * len(data)) and not data.poison_mask[sub].any()
    assert torch.equal(sub, sub.sort().values) and len(sub.unique()) == len(sub)
    assert torch.equal(sub, defender_clean_subset(data, 0.05, seed=0))
    assert not torch.equal(sub, defender_clean_subset(data, 0.05, seed=1))
    with pytest.raises(ValueError, match="unpoisoned"):
        defender_clean_subset(data, 0.95, seed=0)


def test_fine_pruning_never_reads_the_poison_mask(backdoored):
    """The same model and clean indices with a scrambled poison mask: the same result."""
    data = backdoored[1]
    clean = defender_clean_subset(data, 0.1, seed=0)
    g = torch.Generator().manual_seed(5)
    scrambled = PoisonedSet(data.images, data.labels, data.true_labels, data.poison_mask[torch.randperm(len(data), generator=g)])
    results = []
    for d in (data, scrambled):
        engine = engine_from(backdoored, d)
        fp = DEFENSES.create({"name": "fine_pruning", "epochs": 2})
        fp.purify(engine, clean)
        results.append(engine.model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_fine_pruning_prunes_the_most_dormant_channels_within_the_accuracy_margin(backdoored):
    data = backdoored[1]
    clean = defender_clean_subset(data, 0.1, seed=0)
    engine = engine_from(backdoored)
    activation = extract_features(engine.model, data.images[clean]).mean(0)
    fp = DEFENSES.create({"name": "fine_pruning", "epochs": 2, "max_ca_drop": 0.05})
    steps = fp.purify(engine, clean)
    n = int(steps["pruned"]["pruned_channels"])
    assert 0 < n < len(activation), steps["pruned"]
    assert steps["pruned"]["defender_acc_pruned"] >= steps["pruned"]["defender_acc_before"] - 0.05
    zero = (engine.model.fc.weight == 0).all(0)
    assert int(zero.sum()) == n, "pruned channels stay at zero through fine-tuning"
    # the pruned channels are the least active on clean data, whatever their index (the
    # defense measures them on 80% of the subset, so a near-tie may swap at the margin)
    pruned = set(zero.nonzero().squeeze(1).tolist())
    assert len(pruned ^ set(torch.argsort(activation, stable=True)[:n].tolist())) <= 2
    assert float(activation[list(pruned)].max()) <= float(activation.median())
    assert {"clean_acc", "asr"} <= set(steps["fine-tuning"])
    # a saved pruned model needs no hook: reloading its weights gives the same outputs
    clone = copy.deepcopy(engine.model).eval()
    x = data.images[:64].float() / 255
    assert torch.allclose(clone(x), engine.model.eval()(x))


def test_a_fixed_ratio_prunes_that_share_and_a_zero_margin_prunes_little(backdoored):
    clean = defender_clean_subset(backdoored[1], 0.1, seed=0)
    engine = engine_from(backdoored)
    steps = DEFENSES.create({"name": "fine_pruning", "epochs": 0, "prune_ratio": 0.5}).purify(engine, clean)
    assert steps["pruned"]["pruned_ratio"] == 0.5 and "fine-tuning" not in steps
    tight = DEFENSES.create({"name": "fine_pruning", "epochs": 0, "max_ca_drop": 0.0}).purify(engine_from(backdoored), clean)
    assert tight["pruned"]["defender_acc_pruned"] >= tight["pruned"]["defender_acc_before"]


@pytest.mark.parametrize("bad, key", [({"max_ca_drop": 1.5}, "max_ca_drop"), ({"prune_ratio": 1.0}, "prune_ratio"),
                                      ({"clean_fraction": 0}, "clean_fraction"), ({"holdout": 0}, "holdout")])
def test_fine_pruning_rejects_bad_parameters(bad, key):
    with pytest.raises(ConfigError, match=key):
        DEFENSES.create({"name": "fine_pruning", **bad})


# -- NAD ---------------------------------------------------------------------------------


def test_residual_groups_are_the_blocks_before_each_resolution_change():
    from abl.defenses.nad import residual_groups

    wrn = MODELS.create({"name": "wrn", "depth": 16, "widen": 1}).build(10, 32)
    groups = residual_groups(wrn, 32)
    body = list(wrn.body.children())
    assert [body.index(g) for g in groups] == [2, 4, 6], "the last block of each of WRN-16-1's three groups"
    resnet = MODELS.create({"name": "resnet18"}).build(10, 32)
    assert len(residual_groups(resnet, 32)) == 4
    assert len(residual_groups(MODELS.create({"name": "small_cnn"}).build(10, 8), 8)) == 3


def test_attention_map_is_unit_norm_and_power_weighted():
    from abl.defenses.nad import attention_map

    fm = torch.randn(4, 8, 5, 5)
    am = attention_map(fm, 2.0)
    assert am.shape == (4, 1, 5, 5)
    assert torch.allclose(am.flatten(1).norm(dim=1), torch.ones(4), atol=1e-4)
    assert torch.allclose(attention_map(3 * fm, 2.0), am, atol=1e-5), "scale-free"


def test_nad_distils_toward_the_teacher_and_never_reads_the_mask(backdoored):
    data = backdoored[1]
    clean = defender_clean_subset(data, 0.1, seed=0)
    g = torch.Generator().manual_seed(5)
    scrambled = PoisonedSet(data.images, data.labels, data.true_labels, data.poison_mask[torch.randperm(len(data), generator=g)])
    spec = {"name": "nad", "teacher_epochs": 2, "epochs": 2, "betas": [0.0, 500.0, 5000.0]}
    results = []
    for d in (data, scrambled):
        engine = engine_from(backdoored, d)
        steps = DEFENSES.create(spec).purify(engine, clean)
        results.append(engine.model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert [h["phase"] for h in engine.history] == ["teacher"] * 2 + ["distillation"] * 2
    assert {"clean_acc", "asr"} <= set(steps["distillation"]) and "teacher" in steps
    # the attention term changes the student's training: with betas 0 it is plain fine-tuning
    plain = engine_from(backdoored)
    DEFENSES.create({**spec, "betas": [0.0, 0.0, 0.0]}).purify(plain, clean)
    assert any(not torch.equal(results[0][k], plain.model.state_dict()[k]) for k in results[0])


# -- MCR ---------------------------------------------------------------------------------


def test_bezier_runs_from_one_endpoint_to_the_other_through_the_control_point():
    from abl.defenses.mcr import bezier

    w0, theta, w1 = torch.zeros(3), torch.ones(3), torch.full((3,), 4.0)
    assert torch.equal(bezier(0.0, w0, theta, w1), w0) and torch.equal(bezier(1.0, w0, theta, w1), w1)
    assert torch.allclose(bezier(0.5, w0, theta, w1), 0.25 * w0 + 0.5 * theta + 0.25 * w1)


def test_mcr_trains_only_the_control_point_and_records_the_curve(backdoored):
    data = backdoored[1]
    clean = defender_clean_subset(data, 0.1, seed=0)
    engine = engine_from(backdoored)
    w0 = {k: v.clone() for k, v in engine.model.state_dict().items()}
    mcr = DEFENSES.create({"name": "mcr", "finetune_epochs": 2, "epochs": 3, "points": 5, "t": 0.5, "augment": False})
    mcr.notes = {}
    steps = mcr.purify(engine, clean)
    assert [h["phase"] for h in engine.history] == ["finetune"] * 2 + ["curve"] * 3
    curve = mcr.notes["curve"]
    assert [p["t"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # t = 0 is the backdoored model (BatchNorm statistics recomputed on clean data): the
    # backdoor still works there; the endpoint t = 1 is the clean fine-tuned copy
    assert curve[0]["asr"] > 0.5, curve
    assert all(0 <= p["clean_acc"] <= 1 and 0 <= p["asr"] <= 1 for p in curve)
    assert steps["curve"]["t"] == 0.5 and steps["curve"]["clean_acc"] == curve[2]["clean_acc"]
    # the result is a plain model of the same architecture, neither endpoint
    final = engine.model.state_dict()
    assert final.keys() == w0.keys()
    assert any(not torch.equal(final[k], w0[k]) for k in w0 if "weight" in k)


def test_the_curve_model_trains_only_its_control_point(backdoored):
    from abl.defenses.mcr import CurveModel

    engine = engine_from(backdoored)
    base = engine.model
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    w1 = {n: p + 1.0 for n, p in w0.items()}
    curve = CurveModel(base, w1)
    trained = [p for p in curve.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == sum(p.numel() for p in w0.values())
    assert {id(p) for p in trained} == {id(p) for p in curve.theta.parameters()}
    x = backdoored[1].images[:16].float() / 255
    curve.eval()
    base.eval()
    curve.t = 0.0
    with torch.no_grad():
        assert torch.allclose(curve(x), base(x), atol=1e-5), "t = 0 is the first endpoint"
        curve.t = 0.5
        mid = {n: (w0[n] + w1[n]) / 2 for n in w0}  # the control point starts at the midpoint
        from torch.func import functional_call

        assert torch.allclose(curve(x), functional_call(base, mid, (x,)), atol=1e-4)


@pytest.mark.parametrize("defense", [
    {"name": "fine_pruning", "epochs": 3, "augment": False},
    {"name": "nad", "teacher_epochs": 2, "epochs": 3, "betas": [0.0, 50.0, 50.0], "augment": False},
    {"name": "mcr", "finetune_epochs": 2, "epochs": 3, "points": 3, "augment": False},
], ids=lambda d: d["name"])
def test_a_post_training_run_resumed_mid_phase_ends_as_the_uninterrupted_one(defense, tmp_path):
    from abl.experiment import build_experiment, resume_experiment, run_experiment
    from abl.store import RunStore

    def run(runs, **kw):
        raw = {"name": "resume-post", "seed": 0, "dataset": {"name": "digits"},
               "model": {"name": "small_cnn", "width": 8}, "attack": {"name": "badnets", "rate": 0.1, "target": 0},
               "defense": {**defense, "backdoor": {"epochs": 3, "lr": 0.05, "milestones": []}, "clean_fraction": 0.1},
               "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1, "checkpoint_every_s": 0},
               "output": {"runs_dir": str(runs), "cache_dir": str(tmp_path / "cache")}}
        return run_experiment(build_experiment(raw), RunStore(runs), **kw)

    whole = run(tmp_path / "a")
    last_phase = whole.history()[-1]["phase"]

    class Stop(KeyboardInterrupt):
        pass

    def stop(record):
        if record["phase"] == last_phase and record["phase_epoch"] == 1:
            raise Stop()

    with pytest.raises(Stop):
        run(tmp_path / "b", on_epoch=stop)
    (stopped,) = RunStore(tmp_path / "b").list_runs()
    resumed = resume_experiment(stopped.run_id, RunStore(tmp_path / "b"))
    a, b = whole.tensors("model"), resumed.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final_metrics == whole.final_metrics
    assert resumed.json("notes")["clean_subset"] == whole.json("notes")["clean_subset"]


# -- Neural Cleanse ------------------------------------------------------------------------


def test_neural_cleanse_defaults_are_the_authors():
    """bolunwang/backdoor at 06875b9, ``gtsrb_visualize_example.py`` lines 49-68
    (BATCH_SIZE 32, LR 0.1, STEPS 1000, MINI_BATCH = 1000 / 32 = 31 in Python 2, INIT_COST
    1e-3, ATTACK_SUCC_THRESHOLD 0.99, PATIENCE 5, COST_MULTIPLIER 2, EARLY_STOP_THRESHOLD
    1.0, EARLY_STOP_PATIENCE 5 * PATIENCE) and ``visualizer.py`` (RESET_COST_TO_ZERO True);
    the anomaly threshold 2 is the paper's (Section IV-C)."""
    nc = DEFENSES.create({"name": "neural_cleanse"})
    assert (nc.steps, nc.batches_per_step, nc.batch_size, nc.lr, nc.init_cost) == (1000, 31, 32, 0.1, 1e-3)
    assert (nc.attack_threshold, nc.patience, nc.cost_multiplier) == (0.99, 5, 2.0)
    assert (nc.early_stop_threshold, nc.early_stop_patience, nc.cost_from_zero) == (1.0, 25, True)
    assert nc.anomaly_threshold == 2.0


def test_nad_defaults_are_the_authors():
    """bboylyg/NAD at 54f6b20, ``config.py`` lines 15-25 (epochs 20, batch_size 64, lr 0.1,
    momentum 0.9, weight_decay 1e-4, ratio 0.05, beta1 0, beta2 0, beta3 5000, p 2.0),
    ``utils/util.py`` ``adjust_learning_rate`` (the given lr for epochs 0-1, then 0.01) and
    ``main.py`` ``train`` (SGD with ``nesterov=True``). Two values are the ABL appendix's
    (A.3): 10 epochs of distillation, not the NAD code's 20, and Cutout of length 9 (the
    NAD loader's ``Cutout(1, 3)`` is not used). The NAD code also saves the student by its
    test-set accuracy and ASR each epoch; we keep the last epoch (no test-set selection)."""
    from abl.engine import TrainConfig

    nad = DEFENSES.create({"name": "nad"})
    assert (nad.batch_size, nad.lr, nad.milestones, nad.lr_factor) == (64, 0.1, [2], 0.1)
    assert nad.lr * nad.lr_factor == pytest.approx(0.01)
    assert (nad.betas, nad.p, nad.nesterov, nad.clean_fraction) == ([0.0, 0.0, 5000.0], 2.0, True, 0.05)
    assert (TrainConfig().momentum, TrainConfig().weight_decay) == (0.9, 1e-4)
    assert nad.epochs == 10 and nad.augment  # appendix A.3


def test_anomaly_index_flags_only_small_outliers():
    from abl.defenses.neural_cleanse import anomaly_indices

    norms = torch.tensor([4.0, 38.0, 28.0, 39.0, 37.0, 35.0, 41.0, 37.0, 34.0, 39.0])
    index = anomaly_indices(norms)
    assert int(torch.argmax(index)) == 0 and index[0] > 10
    big = anomaly_indices(torch.tensor([100.0, 38.0, 37.0, 39.0, 36.0]))
    assert big[0] < 0, "a large mask is not suspicious however far out"


def test_neural_cleanse_finds_the_target_and_abl_unlearning_removes_the_backdoor(backdoored):
    """Measured on these digits (BadNets to class 0, 10% clean subset, the authors' cost
    schedule with one pass over the subset per step): mask L1 2.9 for class 0 against a
    median of 29 (anomaly index 7.9), every class early-stopped after 62-129 steps (on
    another CPU, whose kernels train these digits otherwise, class 0 ran all 200); GGA on
    67 clean images stamped with the reversed trigger, 5 epochs: ASR 100% -> 9.9% at CA
    96.0% (the ABL paper's Table 11 reports 0.12% for BadNets on CIFAR-10)."""
    data = backdoored[1]
    clean = defender_clean_subset(data, 0.1, seed=0)
    engine = engine_from(backdoored)
    nc = DEFENSES.create({"name": "neural_cleanse", "steps": 200, "batches_per_step": 6,
                          "unlearner": {"name": "gga", "epochs": 5, "holdout": 0, "select": "last", "patience": 0}})
    nc.notes, nc.tensors = {}, {}
    steps = nc.purify(engine, clean)
    assert nc.notes["flagged"][0] == 0 and steps["reverse"]["top_anomaly_index"] > 2, nc.notes
    assert steps["reverse"]["top_mask_l1"] < 0.3 * steps["reverse"]["median_mask_l1"]
    # the early stop ends a class once its mask stops shrinking; the target's mask may still
    # shrink at the step limit (on this CPU's kernels class 0 ran all 200 steps)
    early = [s for s in nc.notes["reverse_steps"] if s < 200]
    assert len(early) >= 8, f"classes must stop once their masks stop shrinking: steps {nc.notes['reverse_steps']}"
    size = data.images.shape[-1]
    assert nc.tensors["nc_masks"].shape == (10, 1, size, size) and nc.tensors["nc_patterns"].shape == (10, 3, size, size)
    after = steps["unlearning"]
    assert steps["reverse"]["asr"] > 0.9 and after["asr"] < 0.2 and after["clean_acc"] > 0.9, after
    # the unlearner saw only the clean subset: the stamped images and the rest of it
    seen = engine.loss_matrix()[-1].isfinite()
    assert bool(seen[clean].all()) and not bool(seen[~torch.isin(torch.arange(len(data)), clean)].any())

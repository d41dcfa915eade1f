"""Contract tests over every registered unlearner, each unlearner's own rule, and ABL as a
composition of any detector with any unlearner (the paper's Table 8 and Figures 7-9)."""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.data.types import PoisonedSet
from abl.defenses import DEFENSES
from abl.detectors import DETECTORS
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.models import MODELS
from abl.unlearning import UNLEARNERS, UnlearnContext, fresh_model

# Short settings per unlearner (1-2 epochs); one invalid parameter each. An unlearner
# registered without entries here fails the tests below, so every new one gets the checks.
SHORT = {
    "gga": {"epochs": 2},
    "ascent": {"epochs": 2},
    "pixel_noise": {"epochs": 1},
    "grad_noise": {"epochs": 1},
    "label_shuffling": {"epochs": 1},
    "label_uniform": {"epochs": 1},
    "label_smoothing": {"epochs": 1},
    "self_learning": {"epochs": 1, "teacher_epochs": 2},
    "finetune_all": {"epochs": 1},
    "finetune_last": {"epochs": 1},
    "finetune_imagenet": {"epochs": 1},  # + the weights file the fixture writes
    "retrain": {"epochs": 2, "milestones": [1]},
}
INVALID = {
    "gga": ({"holdout": 1.0}, "unlearner.holdout"),
    "ascent": ({"epoch": "clean"}, "unlearner.epoch"),
    "pixel_noise": ({"sigma": 0}, "unlearner.sigma"),
    "grad_noise": ({"quantile": 0}, "unlearner.quantile"),
    "label_shuffling": ({"epochs": 0}, "unlearner.epochs"),
    "label_uniform": ({"lr": -1}, "unlearner.lr"),
    "label_smoothing": ({"smoothing_value": 0}, "unlearner.smoothing_value"),
    "self_learning": ({"teacher_epochs": 0}, "unlearner.teacher_epochs"),
    "finetune_all": ({"lr_factor": 2}, "unlearner.lr_factor"),
    "finetune_last": ({"epochs": -1}, "unlearner.epochs"),
    "finetune_imagenet": ({"resize": -1}, "unlearner.resize"),
    "retrain": ({"lr": 0}, "unlearner.lr"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet34_weights(tmp_path_factory):
    """A ResNet-34 state dict in torchvision's layout, written here: nothing can be
    downloaded, and the unlearner must read a user's file the same way."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet34().state_dict().items()}, str(path))
    return str(path)


def spec(name: str, weights: str) -> dict:
    out = {"name": name, **SHORT[name]}
    if name == "finetune_imagenet":
        out["weights"] = weights
    return out


@pytest.fixture(scope="module")
def digits():
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1, "target": 0})
    attack.setup(splits.image_size, splits.num_classes)
    return splits, attack.poison(splits.train), attack.triggered_test(splits.test)


def engine_for(digits, n: int | None = 400) -> Engine:
    splits, data, trig = digits
    if n is not None:
        keep = torch.arange(n)
        data = PoisonedSet(data.images[keep], data.labels[keep], data.true_labels[keep], data.poison_mask[keep])
    torch.manual_seed(0)
    build = lambda: MODELS.create({"name": "small_cnn", "width": 8}).build(10, splits.image_size)  # noqa: E731
    engine = Engine(build(), data, splits.test, trig, TrainConfig(progress=False, batch_size=64, eval_every=0), seed=0)
    engine.model_factory = build
    return engine


def isolated_of(engine: Engine, k: int = 20) -> torch.Tensor:
    """Half poisons, half clean: a realistic, imperfect D_b."""
    mask = engine.data.poison_mask
    return torch.cat([mask.nonzero().squeeze(1)[: k // 2], (~mask).nonzero().squeeze(1)[: k // 2]])


# -- the contract ------------------------------------------------------------------------


def test_every_unlearner_has_short_settings_and_an_invalid_parameter():
    missing = [n for n in UNLEARNERS.names() if n not in SHORT or n not in INVALID]
    assert not missing, f"add unlearners {missing} to SHORT and INVALID"


@pytest.mark.parametrize("name", UNLEARNERS.names())
def test_unlearner_rejects_invalid_parameters(name):
    params, key = INVALID[name]
    with pytest.raises(ConfigError, match=key):
        UNLEARNERS.create({"name": name, **params})
    with pytest.raises(ConfigError, match="unknown key"):
        UNLEARNERS.create({"name": name, "no_such_parameter": 1})


@pytest.mark.parametrize("name", UNLEARNERS.names())
def test_unlearner_contract(name, digits, resnet34_weights):
    engine = engine_for(digits)
    images, labels = engine.data.images.clone(), engine.data.labels.clone()
    iso = isolated_of(engine)
    unlearner = UNLEARNERS.create(spec(name, resnet34_weights))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    metrics = unlearner.unlearn(engine, UnlearnContext(iso))
    assert {"clean_acc", "asr", "stage_s"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ("clean_acc", "asr"))
    assert torch.equal(engine.data.images, images) and torch.equal(engine.data.labels, labels), (
        "an unlearner trains on a modified copy; the training set itself stays as it was"
    )
    assert len(engine.history) == unlearner.total_epochs(), "every epoch it trains is in the history"
    after = engine.model.state_dict()
    assert after.keys() != before.keys() or any(not torch.equal(before[k], after[k]) for k in before), "it trained"
    unlearned = engine.loss_matrix()[-1]
    if unlearner.discards_isolated:
        assert bool(unlearned[iso].isnan().all()), "a method that discards D_b never trains on it"


@pytest.mark.parametrize("name", [n for n in UNLEARNERS.names() if n != "finetune_imagenet"])
def test_unlearner_is_deterministic(name, digits):
    runs = []
    for _ in range(2):
        engine = engine_for(digits, n=200)
        UNLEARNERS.create(spec(name, "")).unlearn(engine, UnlearnContext(isolated_of(engine, 10)))
        runs.append(engine.loss_matrix())
    assert torch.allclose(runs[0], runs[1], equal_nan=True)


# -- what each one does to D_b -------------------------------------------------------------


def _modified(name: str, engine: Engine, iso: torch.Tensor, **params):
    unlearner = UNLEARNERS.create({"name": name, **params})
    return unlearner.modify(engine, UnlearnContext(iso), torch.Generator().manual_seed(0))


def test_pixel_noise_perturbs_only_the_isolated_images(digits):
    engine = engine_for(digits)
    iso = isolated_of(engine)
    images, labels, smoothing = _modified("pixel_noise", engine, iso, sigma=0.1)
    changed = (images != engine.data.images).flatten(1).any(1)
    assert changed[iso].all() and not changed.sum() > len(iso), "every D_b image, nothing else"
    assert labels is None and smoothing == 0.0
    diff = (images[iso].float() - engine.data.images[iso].float()) / 255
    assert 0.05 < float(diff.std()) < 0.15, "noise of about sigma (less where it clips)"


def test_grad_noise_perturbs_the_quarter_with_the_largest_gradient(digits):
    engine = engine_for(digits)
    iso = isolated_of(engine)
    images, _, _ = _modified("grad_noise", engine, iso, sigma=0.3)
    changed = (images != engine.data.images).flatten(1)
    assert not changed[~torch.isin(torch.arange(len(images)), iso)].any()
    share = changed[iso].float().mean(1)
    # a quarter get noise; some of it rounds away or clips at 0/255
    assert bool((share <= 0.25 + 1e-6).all()) and float(share.mean()) > 0.12, share


def test_label_methods_change_only_the_isolated_labels(digits):
    engine = engine_for(digits)
    iso = isolated_of(engine)
    rest = ~torch.isin(torch.arange(len(engine.data)), iso)
    _, shuffled, _ = _modified("label_shuffling", engine, iso)
    assert torch.equal(shuffled[rest], engine.data.labels[rest])
    assert sorted(shuffled[iso].tolist()) == sorted(engine.data.labels[iso].tolist()), "a permutation of D_b's labels"
    assert not torch.equal(shuffled[iso], engine.data.labels[iso])
    _, uniform, _ = _modified("label_uniform", engine, iso)
    assert torch.equal(uniform[rest], engine.data.labels[rest])
    assert len(uniform[iso].unique()) > 4 and int(uniform.max()) <= 9
    _, _, eps = _modified("label_smoothing", engine, iso, smoothing_value=0.4)
    assert bool((eps[iso] == 0.4).all()) and not eps[rest].any()


def test_self_learning_relabels_poisons_with_a_teacher_trained_on_the_rest(digits):
    engine = engine_for(digits, n=None)
    mask = engine.data.poison_mask
    # every poison isolated: a teacher on the rest never sees the trigger (with poisons left
    # in D_c it learns the trigger too and relabels them all to the target: the paper's
    # explanation of why self-learning fails in Table 8)
    iso = mask.nonzero().squeeze(1)
    _, labels, _ = _modified("self_learning", engine, iso, teacher_epochs=8, teacher_lr=0.05, teacher_milestones=[])
    truth = engine.data.true_labels[iso]
    assert float((labels[iso] == truth).float().mean()) > 0.7, "the teacher never saw D_b's wrong labels"
    assert float((engine.data.labels[iso] == truth).float().mean()) < 0.2
    assert [h["phase"] for h in engine.history] == ["teacher"] * 8


def test_finetune_last_trains_only_the_classifier(digits):
    engine = engine_for(digits)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    UNLEARNERS.create({"name": "finetune_last", "epochs": 1}).unlearn(engine, UnlearnContext(isolated_of(engine)))
    after = engine.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"fc.weight", "fc.bias"}, moved
    assert all(p.requires_grad for p in engine.model.parameters()), "unfrozen afterwards"


def test_retrain_starts_from_fresh_weights(digits):
    engine = engine_for(digits)
    engine.run_phase("train", epochs=1, lr=0.05)
    torch.manual_seed(engine.seed + 1)
    expected = engine.model_factory().state_dict()
    fresh_model(engine, engine.seed + 1)
    assert all(torch.equal(expected[k], v) for k, v in engine.model.state_dict().items())


def test_finetune_imagenet_replaces_the_model_and_trains_layer4_only(digits, resnet34_weights, tmp_path):
    engine = engine_for(digits)
    from safetensors.torch import load_file

    pretrained = load_file(resnet34_weights)
    UNLEARNERS.create(spec("finetune_imagenet", resnet34_weights)).unlearn(engine, UnlearnContext(isolated_of(engine)))
    net = engine.model.net
    state = net.state_dict()
    assert torch.equal(state["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"]), "frozen"
    assert torch.equal(state["layer1.0.bn1.running_mean"], pretrained["layer1.0.bn1.running_mean"]), "frozen BN"
    assert not torch.equal(state["layer4.0.conv1.weight"], pretrained["layer4.0.conv1.weight"]), "fine-tuned"
    assert net.fc.out_features == 10
    with pytest.raises(ConfigError, match="unlearner.weights.*no file"):  # when the config is read
        UNLEARNERS.create({"name": "finetune_imagenet", "weights": str(tmp_path / "missing.pt")})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(ConfigError, match="not a torchvision ResNet-34"):
        UNLEARNERS.create({"name": "finetune_imagenet", "weights": str(bad)}).unlearn(
            engine_for(digits), UnlearnContext(isolated_of(engine))
        )


# -- ABL as a composition: any detector with any unlearner ---------------------------------

TINY_DETECTOR = {"epochs": 1, "rank_epochs": 1}


def detector_spec(name: str) -> dict:
    return {"name": name, **({} if DETECTORS.get(name).uses_backdoored else TINY_DETECTOR)}


@pytest.fixture(scope="module")
def pair_digits(digits):
    splits, data, trig = digits
    keep = torch.arange(300)
    small = PoisonedSet(data.images[keep], data.labels[keep], data.true_labels[keep], data.poison_mask[keep])
    return splits, small, trig


@pytest.mark.parametrize("detector", DETECTORS.names())
def test_every_detector_with_every_unlearner_runs(detector, pair_digits, resnet34_weights, tmp_path):
    """ABL with each detector (its stage computed once) and every unlearner."""
    for unlearner in UNLEARNERS.names():
        engine = engine_for(pair_digits, n=None)
        engine.stage_dir = tmp_path  # model-based detectors train the backdoored model once
        defense = DEFENSES.create({
            "name": "abl", "detector": detector_spec(detector), "unlearner": spec(unlearner, resnet34_weights),
            "isolation_rate": 0.05, "recovery_epochs": 0, "backdoor": {"epochs": 1, "lr": 0.05, "milestones": []},
        })
        result = defense.run(engine)
        assert {"isolation", "unlearning", "final"} <= set(result.metrics), (detector, unlearner)
        assert len(result.isolated) == 15
        assert result.notes["detector"]["name"] == detector and result.notes["unlearner"]["name"] == unlearner
        assert 0 <= result.metrics["final"]["asr"] <= 1


@pytest.mark.parametrize("name", ["grad_noise", "self_learning"])
def test_a_run_resumed_mid_unlearning_trains_on_the_same_modified_examples(name, tmp_path):
    """Both compute D_b's new rows from a model (input gradients, a teacher) that a resumed
    run has not restored yet when it recomputes them: the checkpoint carries the rows."""
    from abl.experiment import build_experiment, resume_experiment, run_experiment
    from abl.store import RunStore

    extra = {"sigma": 0.3} if name == "grad_noise" else {"teacher_epochs": 2, "teacher_milestones": []}
    unlearner = {"name": name, "epochs": 3, **extra}

    def run(runs, **kw):
        raw = {"name": "resume-unlearner", "seed": 0, "dataset": {"name": "digits"},
               "model": {"name": "small_cnn", "width": 8}, "attack": {"name": "badnets", "rate": 0.1, "target": 0},
               "defense": {"name": "abl", "isolation_epochs": 2, "recovery_epochs": 1, "isolation_rate": 0.05,
                           "unlearner": unlearner},
               "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1, "checkpoint_every_s": 0},
               "output": {"runs_dir": str(runs), "cache_dir": str(tmp_path / "cache")}}
        return run_experiment(build_experiment(raw), RunStore(runs), **kw)

    whole = run(tmp_path / "a")

    class Stop(KeyboardInterrupt):
        pass

    def stop(record):
        if record["phase"] == "unlearning" and record["phase_epoch"] == 1:
            raise Stop()

    with pytest.raises(Stop):
        run(tmp_path / "b", on_epoch=stop)
    (stopped,) = RunStore(tmp_path / "b").list_runs()
    resumed = resume_experiment(stopped.run_id, RunStore(tmp_path / "b"))
    a, b = whole.tensors("model"), resumed.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Contract tests over every registered detector, the shared helpers, and real detection on
digits with BadNets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.data.types import PoisonedSet
from abl.detectors import DETECTORS, detection_metrics, extract_features, isolate
from abl.detectors.activation_clustering import ActivationClustering
from abl.detectors.spectral import SpectralSignatures
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.models import MODELS

# One invalid parameter per detector; a detector registered without an entry here fails
# the contract test below, so every new detector gets the same checks.
INVALID = {
    "activation_clustering": ({"dims": 0}, "detector.dims"),
    "spectral_signatures": ({"components": 0}, "detector.components"),
    "lga": ({"gamma": -1}, "detector.gamma"),
    "lga_batch": ({"gamma": -0.5}, "detector.gamma"),
    "abl_default": ({"rank_epochs": 30}, "detector.rank_epochs"),
    "flooding": ({"lr": 0}, "detector.lr"),
    "cross_entropy": ({"epochs": 0}, "detector.epochs"),
    "label_smoothing": ({"smoothing_value": 1.5}, "detector.smoothing_value"),
}
MODEL_BASED = [n for n in DETECTORS.names() if DETECTORS.get(n).uses_backdoored]
TRAINING = [n for n in DETECTORS.names() if not DETECTORS.get(n).uses_backdoored]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poisoned_digits(rate: float):
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": rate, "target": 0})
    attack.setup(splits.image_size, splits.num_classes)
    return splits, attack.poison(splits.train), attack.triggered_test(splits.test)


# 10%: the setting; on 10 classes the target class is then half poison, against
# both detectors' premise (a minority sub-population). 5%: a third of the target class.
# The detectors' results swing from one training run to the next (AC at 10% failed
# outright for one seed of five, precision at 1% 0.00), and the same seed trains a
# different model on another CPU's kernels: a test on one run held thresholds measured on
# another machine and failed here. So each rate trains SEEDS models and the test holds
# the median of each metric.
SEEDS = range(5)


@pytest.fixture(scope="module", params=[0.1, 0.05], ids=["rate0.1", "rate0.05"])
def backdoored(request):
    """Small CNNs trained on poisoned digits until the backdoor is learned, one per seed (~6-10 s each)."""
    splits, data, trig = poisoned_digits(request.param)
    models = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
        cfg = TrainConfig(progress=False, threads=1, eval_every=0, checkpoint=False, batch_size=64)
        engine = Engine(model, data, splits.test, trig, cfg, seed=seed)
        engine.run_phase("train", epochs=12, lr=0.05, milestones=[9])
        final = engine.history[-1]
        assert final["asr"] > 0.9 and final["clean_acc"] > 0.9, f"seed {seed}: the backdoored model is not usable: {final}"
        models.append(model.eval())
    return request.param, models, data


@pytest.fixture(scope="module")
def small():
    """300 examples and an untrained model: enough for the contract, in a fraction of a second."""
    splits, data, _ = poisoned_digits(0.1)
    keep = torch.arange(300)
    sub = PoisonedSet(data.images[keep], data.labels[keep], data.true_labels[keep], data.poison_mask[keep])
    torch.manual_seed(1)
    return MODELS.create({"name": "small_cnn", "width": 8}).build(10, splits.image_size), sub


# -- the contract, for every registered detector -------------------------------------------


def test_every_detector_has_an_invalid_parameter_listed():
    missing = [n for n in DETECTORS.names() if n not in INVALID]
    assert not missing, f"add an invalid parameter for detectors {missing} to INVALID"


@pytest.mark.parametrize("name", MODEL_BASED)
def test_detector_contract(name, small):
    model, data = small
    model.train()
    detector = DETECTORS.create({"name": name})
    scores = detector.score(model, data, batch_size=128)  # several feature batches
    assert scores.shape == (len(data),) and scores.dtype == torch.float32
    assert bool(torch.isfinite(scores).all())
    assert len(torch.unique(scores)) > 10, "scores must rank examples, not only flag classes"
    assert model.training, "scoring must leave the model's mode as it was"
    # a detector sees what a defender sees: the ground truth must not change its scores
    blind = PoisonedSet(data.images, data.labels, data.labels.clone(), torch.zeros_like(data.poison_mask))
    again = DETECTORS.create({"name": name}).score(model, blind, batch_size=300)
    assert torch.equal(scores, again), "scores must be deterministic, blind to the ground truth and the batch size"


@pytest.mark.parametrize("name", DETECTORS.names())
def test_detector_rejects_invalid_parameters(name):
    params, key = INVALID[name]
    with pytest.raises(ConfigError, match=key):
        DETECTORS.create({"name": name, **params})
    with pytest.raises(ConfigError, match="unknown key"):
        DETECTORS.create({"name": name, "no_such_parameter": 1})


def test_invalid_choices_are_config_errors():
    with pytest.raises(ConfigError, match="detector.reduce"):
        DETECTORS.create({"name": "activation_clustering", "reduce": "tsne"})
    with pytest.raises(ConfigError, match="detector.normalise"):
        DETECTORS.create({"name": "spectral_signatures", "normalise": "rank"})


def test_features_are_eval_mode_and_batch_independent(small):
    model, data = small
    model.train()
    whole = extract_features(model, data.images, batch_size=len(data))
    assert whole.shape == (len(data), model.feature_dim) and whole.dtype == torch.float64
    assert torch.allclose(extract_features(model, data.images, batch_size=7), whole, atol=1e-5)
    assert model.training


# -- the shared helpers -------------------------------------------------------------------


def test_isolate_takes_the_top_fraction_most_suspicious_first_stably():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.7, 0.2, 0.3, 0.4, 0.6])
    assert isolate(scores, 0.3).tolist() == [1, 3, 5]  # tie at 0.9: lower index first
    assert isolate(scores, 0.01).tolist() == [1]  # never empty
    assert isolate(scores, 1.0).tolist() == [1, 3, 5, 9, 2, 8, 7, 6, 0, 4]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="rate"):
            isolate(scores, bad)
    with pytest.raises(ValueError, match="finite"):
        isolate(torch.tensor([0.0, float("nan")]), 0.5)


def test_detection_metrics_on_known_rankings():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[:10] = True
    perfect = detection_metrics(mask.float(), mask, 0.1)
    assert perfect == {"precision": 1.0, "recall": 1.0, "auprc": 1.0, "base_rate": 0.1, "count": 10.0}
    worst = detection_metrics(-mask.float() + torch.arange(100) * 1e-3, mask, 0.05)
    assert worst["precision"] == 0.0 and worst["recall"] == 0.0 and worst["auprc"] < 0.15
    # half the poisons on top, half at the bottom: P@10% = 0.5, AP = (5 * 1 + 5 * 10/100) / 10
    half = torch.zeros(100)
    half[:5] = 1.0
    half[5:10] = -1.0
    mixed = detection_metrics(half, mask, 0.1)
    assert mixed["precision"] == 0.5 and mixed["recall"] == 0.5 and math.isclose(mixed["auprc"], 0.55)
    clean = detection_metrics(torch.rand(100), torch.zeros(100, dtype=torch.bool), 0.1)
    assert math.isnan(clean["precision"]) and math.isnan(clean["auprc"]) and clean["base_rate"] == 0.0


# -- each detector's per-class rules, on synthetic features --------------------------------


def two_populations(n_clean: int, n_odd: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features of a clean majority and an odd minority moved by ``shift``."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_clean + n_odd, 16))
    feats[n_clean:, :3] += shift
    return feats, np.arange(n_clean + n_odd) >= n_clean


def test_activation_clustering_flags_the_smaller_separated_cluster():
    ac = ActivationClustering(reduce="pca")
    feats, odd = two_populations(80, 20, shift=6.0)
    scores = ac.class_scores(feats)
    assert scores[odd].min() > scores[~odd].max(), "the small cluster must outrank the large one"
    # a weaker, relatively larger split scores lower than a strong, small one
    weak = ac.class_scores(two_populations(60, 40, shift=3.0, seed=1)[0])
    assert scores.max() > weak.max()
    # too few examples for the reduction, or nothing varies: no split, score 0
    assert not ac.class_scores(feats[:10]).any()
    assert not ac.class_scores(np.ones((50, 16))).any()


def test_spectral_signatures_scores_the_shifted_minority_highest():
    ss = SpectralSignatures()
    feats, odd = two_populations(90, 10, shift=5.0)
    scores = ss.class_scores(torch.from_numpy(feats))
    assert scores[torch.from_numpy(odd)].min() > scores[torch.from_numpy(~odd)].median()
    # centred: moving the whole class does not change the scores
    assert torch.allclose(ss.class_scores(torch.from_numpy(feats + 100.0)), scores, rtol=1e-6, atol=1e-6)
    assert not ss.class_scores(torch.ones(1, 16)).any()
    median = SpectralSignatures(normalise="median").class_scores(torch.from_numpy(feats))
    assert math.isclose(float(median.median()), 1.0, rel_tol=1e-9)


# -- real detection: digits, BadNets to class 0, a backdoored small CNN --------------------

# Measured on these fixtures (one thread, AMD EPYC, 2026-12-06), per seed 0-4. Over the
# whole set, AUPRC / precision at 1% / at the poison rate; within the target class, AUPRC
# (its base rate: 0.50 at 10%, 0.34 at 5%); the median of the five in brackets:
#   10%: activation clustering AUPRC 0.30 0.55 0.28 0.57 0.83 (0.55), P@1% 1 1 0 1 1 (1.0),
#          P@rate (0.44), within 0.96 0.98 0.32 0.97 0.99 (0.97)
#        spectral signatures   AUPRC 0.30 0.23 0.25 0.29 0.25 (0.25), P@1% (0.77), P@rate
#          (0.26), within 0.76 0.60 0.60 0.74 0.59 (0.60)
#    5%: activation clustering AUPRC (0.70), P@1% (1.0), P@rate (0.59), within (0.99)
#        spectral signatures   AUPRC 0.38 0.59 0.34 0.29 0.33 (0.34), P@1% (0.77), P@rate
#          (0.39), within (0.75)
# On the 2-core AMD EPYC with AVX2 and no AVX-512 (2026-12-07; the same values from the code
# at 933f93f, so the CPU's kernels, not a code change) activation clustering at 5% gave
# AUPRC 0.37 0.24 0.51 0.38 0.68 (0.38), P@rate 0.33 0.21 0.42 0.35 0.62 (0.35): its 5%
# AUPRC and P@rate thresholds are 0.30, below the lower of the two machines' medians and
# still six times the base rate.
# Thresholds sit below those medians and above the base rates and what the broken variants
# we tried gave (scoring the larger cluster: within-class AUPRC 0.72-0.74; projecting on
# the smallest singular direction: AUPRC 0.15 at 5%).
EXPECTED = {
    ("activation_clustering", 0.1): {"auprc": 0.35, "precision_1pc": 0.9, "precision_rate": 0.25, "within": 0.9},
    ("spectral_signatures", 0.1): {"auprc": 0.18, "precision_1pc": 0.5, "precision_rate": 0.15, "within": 0.55},
    ("activation_clustering", 0.05): {"auprc": 0.30, "precision_1pc": 0.9, "precision_rate": 0.30, "within": 0.9},
    ("spectral_signatures", 0.05): {"auprc": 0.25, "precision_1pc": 0.5, "precision_rate": 0.25, "within": 0.6},
}


@pytest.mark.parametrize("name", MODEL_BASED)
def test_detector_ranks_backdoor_poisons_high(name, backdoored):
    rate, models, data = backdoored
    assert (name, rate) in EXPECTED, f"measure detector '{name}' at rate {rate} and add it to EXPECTED"
    want = EXPECTED[(name, rate)]
    base = float(data.poison_mask.float().mean())
    target = data.labels == 0
    runs = []
    for model in models:
        scores = DETECTORS.create({"name": name}).score(model, data)
        at_1pc = detection_metrics(scores, data.poison_mask, 0.01)
        runs.append({
            "auprc": at_1pc["auprc"],
            "precision_1pc": at_1pc["precision"],
            "precision_rate": detection_metrics(scores, data.poison_mask, base)["precision"],
            # the poisoned class itself: poisons above its clean examples (the detectors' core claim)
            "within": detection_metrics(scores[target], data.poison_mask[target], base)["auprc"],
        })
    for key, threshold in want.items():
        values = [r[key] for r in runs]
        median = float(np.median(values))
        assert median >= threshold, f"{key}: median {median:.3f} over seeds {[round(v, 2) for v in values]} < {threshold}"


# -- training detectors: they train their own isolation model through the engine ----------


def digits_engine(rate: float = 0.1, n: int | None = None, seed: int = 0) -> Engine:
    splits, data, trig = poisoned_digits(rate)
    if n is not None:
        keep = torch.arange(n)
        data = PoisonedSet(data.images[keep], data.labels[keep], data.true_labels[keep], data.poison_mask[keep])
    torch.manual_seed(seed)
    model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
    cfg = TrainConfig(progress=False, threads=1, eval_every=0, checkpoint=False, batch_size=64)
    return Engine(model, data, splits.test, trig, cfg, seed=seed)


@pytest.mark.parametrize("name", TRAINING)
def test_training_detector_contract(name):
    engine = digits_engine(n=300)
    detector = DETECTORS.create({"name": name, "epochs": 2, "rank_epochs": 2})
    scores = detector.detect(engine)
    assert scores.shape == (300,) and scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    assert len(torch.unique(scores)) > 10
    assert [r["phase"] for r in engine.history] == ["isolation", "isolation"], "it trains through the engine"
    assert engine.model.training
    with pytest.raises(TypeError, match="trains its own model"):
        detector.score(engine.model, engine.data)
    again = DETECTORS.create({"name": name, "epochs": 2, "rank_epochs": 2}).detect(digits_engine(n=300))
    assert torch.equal(scores, again), "deterministic under the engine's seed"


# Measured on all 1,797 digits, BadNets 10% to class 0, small CNN, 10 epochs at lr 0.05
# (one thread, AMD EPYC with AVX-512, 2026-12-06), precision of the 1% isolated for seeds
# 0-4 (median): lga_batch = flooding 0.15 1.00 0.69 1.00 0.85 (0.85), abl_default 0.00 1.00
# 0.85 0.92 0.85 (0.85); cross_entropy 0.31 0.00 0.08 0.92 0.92 (0.31), label_smoothing
# 0.00 0.08 0.46 0.00 0.08 (0.08), per-example lga 0.00 0.00 0.62 0.85 0.23 (0.23). One run
# is no evidence on these easy digits (seed 0 alone inverts the order, and on another CPU
# the same seed gave lga_batch 1.00, cross_entropy 0.00): the test holds the medians. The
# paper's Table 7 and Figure 9 in miniature: a loss that holds the batch mean at gamma
# separates the poisons, plain training (gamma = 0) and label smoothing do not (CIFAR-10:
# 100% vs 26%).
SEPARATES = {"lga_batch": True, "flooding": True, "abl_default": True, "cross_entropy": False,
             "label_smoothing": False, "lga": False}


@pytest.fixture(scope="module")
def training_scores():
    """Per training detector, (scores, poison mask) of each seed in SEEDS."""
    out = {}
    for name in TRAINING:
        out[name] = []
        for seed in SEEDS:
            engine = digits_engine(seed=seed)
            scores = DETECTORS.create({"name": name, "epochs": 10, "lr": 0.05}).detect(engine)
            out[name].append((scores, engine.data.poison_mask))
    return out


@pytest.mark.parametrize("name", TRAINING)
def test_training_detector_isolation_matches_the_papers_ordering(name, training_scores):
    assert name in SEPARATES, f"measure detector '{name}' on digits and add it to SEPARATES"
    precisions = [detection_metrics(scores, mask, 0.01)["precision"] for scores, mask in training_scores[name]]
    median = float(np.median(precisions))
    shown = [round(p, 2) for p in precisions]
    if SEPARATES[name]:
        assert median >= 0.6, f"{name}: median precision at 1% {median:.2f} over seeds {shown}"
    else:
        assert median <= 0.5, f"{name}: median precision at 1% {median:.2f} over seeds {shown}; the paper's baseline should fail here"


def test_lga_batch_and_flooding_rank_alike(training_scores):
    """``sign(L - g) * L`` and ``|L - g| + g`` have the same gradient: same model, same ranking."""
    for (lga, _), (flood, _) in zip(training_scores["lga_batch"], training_scores["flooding"]):
        assert torch.equal(lga, flood)

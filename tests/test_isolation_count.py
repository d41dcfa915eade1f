"""Deciding how many examples to isolate from the scores (issue 25): the rules on planted
scores, on a stored real score vector, and ABL's ``isolation_count: auto`` end to end."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from abl.errors import ConfigError
from abl.isolation_count import CHOICE, RULES, binomial_sf, decide_count

FIXTURES = Path(__file__).parent / "fixtures"


def clean_scores(n: int = 5000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-loss-like scores of a clean run: one smooth distribution, labels balanced."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) - 1.5, torch.arange(n) % classes


def test_no_attack_isolates_nothing():
    for seed in range(5):
        s, y = clean_scores(seed=seed)
        d = decide_count(s, y)
        assert d.count == 0 and not d.evidence and d.labels == []
        assert d.reason.startswith("no backdoor evidence")


def test_a_planted_low_cluster_in_one_label_is_isolated_exactly():
    s, y = clean_scores()
    planted = torch.arange(0, 500, 10)[:40]  # 40 examples, all of label 0
    assert bool((y[planted] == 0).all())
    s[planted] = -12.0 + 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(1))
    d = decide_count(s, y)
    assert d.labels == [0]
    assert sorted(d.indices.tolist()) == sorted(planted.tolist())
    assert bool((s[d.indices][1:] >= s[d.indices][:-1]).all()), "most suspicious first"
    assert d.below[0] == 40 and d.expected[0] < 1


def test_twenty_percent_planted_are_all_isolated():
    s, y = clean_scores()
    poisons = torch.randperm(5000, generator=torch.Generator().manual_seed(2))[:1000]
    y[poisons] = 3  # all-to-one: every poison carries the target label
    s[poisons] = -11.0 + torch.randn(1000, generator=torch.Generator().manual_seed(3))
    d = decide_count(s, y)
    assert d.labels == [3] and d.count == 1000
    assert set(d.indices.tolist()) == set(poisons.tolist())
    # the null is the other labels' rate, which the 1,000 do not inflate
    assert d.expected[3] < 2
    e = decide_count(s, y, "label_excess")
    assert e.labels == [3] and e.expected[3] < 2


def test_an_easier_label_is_not_a_backdoor():
    """Classes are learned at different speeds (on the digits, 0 and 4 sit lowest): a whole
    label shifted 4 spreads down is an easy class, not poisons, and is isolated nowhere."""
    s, y = clean_scores()
    mad = float((s - s.median()).abs().median())
    s[y == 0] -= 4 * mad
    assert decide_count(s, y).count == 0
    # the unshifted per-label test takes the easy class's tail; the shifted one does not
    assert decide_count(s, y, "label_excess").labels == [0]
    assert decide_count(s, y, "shifted_excess").count == 0
    # far lower still, the class is one mode, not two: the mixture's bimodality test holds it
    s[y == 0] -= 4 * mad
    assert decide_count(s, y).count == 0


def test_a_low_cluster_not_far_enough_down_is_not_isolated():
    """A tight cluster 2.5 spreads down in one label (clean labels' low modes reached 3.0 on
    the CIFAR-10 slice) is below the mixture's 4; moved to 8, it is isolated."""
    s, y = clean_scores()
    mad = float((s - s.median()).abs().median())
    planted = (y == 0).nonzero().squeeze(1)[:40]
    s[planted] = float(s.median()) - 2.5 * mad + 0.01 * torch.randn(40, generator=torch.Generator().manual_seed(4))
    assert decide_count(s, y).count == 0
    s[planted] -= 5.5 * mad
    assert sorted(decide_count(s, y).indices.tolist()) == sorted(planted.tolist())


def test_a_clean_tail_spread_over_the_labels_is_not_isolated():
    """Far-low examples in every label as chance predicts: the per-label rule isolates none,
    where the label-blind threshold takes them all."""
    s, y = clean_scores()
    tail = torch.arange(0, 5000, 101)[:50]  # 50 examples, 5 per label
    assert torch.bincount(y[tail]).tolist() == [5] * 10
    s[tail] = -12.0
    d = decide_count(s, y, "label_excess")
    assert d.count == 0 and d.reason.endswith("spread over the labels as chance predicts")
    assert decide_count(s, y, "threshold").count == sum(d.below.values()) >= 50
    # every label has a far-low mode of 5 here; the other labels hold as many below it
    d = decide_count(s, y)
    assert d.count == 0 and d.reason.startswith("no backdoor evidence")


def test_binomial_tail_is_exact():
    from math import comb

    for k, n, p in ((3, 10, 0.2), (0, 5, 0.5), (7, 7, 0.9), (12, 500, 0.002)):
        exact = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_sf(k, n, p) == pytest.approx(exact, rel=1e-9)


def test_bad_inputs_are_refused():
    s, y = clean_scores(100)
    with pytest.raises(ConfigError, match="100 scores but 99 labels"):
        decide_count(s, y[:99])
    bad = s.clone()
    bad[3] = float("nan")
    with pytest.raises(ConfigError, match="NaN or infinite"):
        decide_count(bad, y)
    with pytest.raises(ConfigError, match="unknown isolation count rule 'gmm'"):
        decide_count(s, y, "gmm")
    with pytest.raises(ConfigError, match="spreads must be > 0"):
        decide_count(s, y, spreads=0)


def test_the_per_label_rules_isolate_nothing_on_clean_scores():
    """The label-blind threshold is not among them: on 5,000 normal scores, 6 MADs (4.0 sd)
    below the median leave about 0.13 examples by chance, and this draw holds one."""
    s, y = clean_scores()
    assert CHOICE in RULES
    for rule in ("label_excess", "shifted_excess", "mixture"):
        assert decide_count(s, y, rule).count == 0, rule
    assert decide_count(s, y, "threshold").count == 1


def test_a_stored_real_score_vector():
    """A real isolation's scores (CIFAR-10 slice, BadNets 10%, trajectory ranking after 20
    epochs of batch-mean LGA), its labels after poisoning and its poison mask, and a clean
    run's (tests/fixtures/README.md says which runs)."""
    with np.load(FIXTURES / "isolation_scores_badnets.npz", allow_pickle=False) as f:
        s, y, mask = (torch.from_numpy(f[k]) for k in ("scores", "labels", "poison_mask"))
    d = decide_count(s.float(), y.long())
    assert d.labels == [0]
    tp = int(mask[d.indices].sum())
    # measured: 515 isolated, 495 of the 500 poisons (the fixed 1% takes 50)
    assert tp / d.count >= 0.95 and tp / int(mask.sum()) >= 0.95
    with np.load(FIXTURES / "isolation_scores_clean.npz", allow_pickle=False) as f:
        s, y = torch.from_numpy(f["scores"]).float(), torch.from_numpy(f["labels"]).long()
    assert decide_count(s, y).count == 0


# -- ABL with ``isolation_count: auto`` on the digits --------------------------------------

def _digits_engine(poisoned: bool):
    from abl.attacks import ATTACKS
    from abl.data import DATASETS
    from abl.data.types import PoisonedSet
    from abl.engine import Engine, TrainConfig
    from abl.models import MODELS

    splits = DATASETS.create({"name": "digits"}).load()
    if poisoned:
        attack = ATTACKS.create({"name": "badnets", "rate": 0.1})
        attack.setup(splits.image_size, splits.num_classes)
        data, trig = attack.poison(splits.train), attack.triggered_test(splits.test)
    else:
        labels = splits.train.labels
        data = PoisonedSet(splits.train.images, labels, labels.clone(), torch.zeros(len(labels), dtype=torch.bool))
        trig = None
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
    return Engine(model, data, splits.test, trig, TrainConfig(progress=False, batch_size=128, eval_every=0), seed=0)


def _run_auto(engine):
    from abl.defenses import DEFENSES

    abl = DEFENSES.create({"name": "abl", "isolation_count": "auto", "recovery_epochs": 2, "unlearning_epochs": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = abl.run(engine)
    return abl, result, [str(w.message) for w in caught]


def test_auto_on_clean_digits_isolates_nothing_and_does_not_unlearn():
    engine = _digits_engine(poisoned=False)
    abl, result, said = _run_auto(engine)
    assert len(result.isolated) == 0
    iso = result.metrics["isolation"]
    assert iso["iso_count"] == 0 and iso["iso_evidence"] == 0 and iso["iso_weak"] == 0
    assert "unlearning" not in result.metrics
    assert [h["phase"] for h in engine.history] == ["isolation"] * 20 + ["recovery"] * 2
    # recovery trained every example: nothing was set aside
    assert bool(engine.loss_matrix()[20:].isfinite().all())
    assert result.metrics["final"]["iso_evidence"] == 0
    assert any("no backdoor evidence" in m for m in said)


def test_auto_on_poisoned_digits_isolates_poisons_only():
    engine = _digits_engine(poisoned=True)
    abl, result, said = _run_auto(engine)
    iso = result.metrics["isolation"]
    mask = engine.data.poison_mask
    assert iso["iso_evidence"] == 1 and iso["iso_precision"] == 1.0
    # more than the fixed 1% (13 of 1,347), all of them poisons
    assert len(result.isolated) > int(0.01 * len(mask)) and bool(mask[result.isolated].all())
    assert "unlearning" in result.metrics
    assert not any("no backdoor evidence" in m for m in said)


def test_auto_is_the_defaults_rule_and_fixed_keeps_its_own():
    from abl.defenses import DEFENSES

    assert DEFENSES.create({"name": "abl"}).isolation_count == "auto"
    for preset in ("paper", "official"):
        assert DEFENSES.create({"name": "abl", "preset": preset}).isolation_count == "fixed"
    # auto was measured on ABL's own scores: another detector keeps the fixed rate unless asked
    det = {"name": "spectral_signatures"}
    assert DEFENSES.create({"name": "abl", "detector": det}).isolation_count == "fixed"
    assert DEFENSES.create({"name": "abl", "detector": det, "isolation_count": "auto"}).isolation_count == "auto"
    with pytest.raises(ConfigError, match="isolation_count"):
        DEFENSES.create({"name": "abl", "isolation_count": "adaptive"})
    with pytest.raises(ConfigError, match="isolation_spreads"):
        DEFENSES.create({"name": "abl", "isolation_spreads": 0})
    # the "< 1 example" refusal is fixed's: auto may isolate none by decision
    tiny = DEFENSES.create({"name": "abl", "isolation_rate": 0.001, "isolation_count": "fixed"})
    with pytest.raises(ConfigError, match="isolates"):
        tiny.check_run(500)
    DEFENSES.create({"name": "abl", "isolation_rate": 0.001, "isolation_count": "auto"}).check_run(500)
    s, y = clean_scores(1000)
    s[:5] = -20.0
    fixed = DEFENSES.create({"name": "abl", "isolation_rate": 0.01, "isolation_count": "fixed"})
    assert len(fixed.isolate(s)[0]) == 10  # the lowest 1%, labels unused
    auto = DEFENSES.create({"name": "abl"})
    with pytest.raises(ConfigError, match="needs the training labels"):
        auto.isolate(s)


def test_auto_shares_the_isolation_phase_but_not_the_isolated_stage(tmp_path):
    """The scores do not depend on the count rule, so an ``auto`` run reads the isolation
    phase a ``fixed`` run cached; recovery trains on D_c, so the isolation+recovery stage is
    keyed on the rule and an ``auto`` run never takes a ``fixed`` run's."""
    import copy

    from abl.experiment import build_experiment, run_experiment
    from abl.store import RunStore

    base = {
        "name": "count", "seed": 0, "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 8},
        "attack": {"name": "badnets", "rate": 0.1, "target": 0},
        "defense": {"name": "abl", "isolation_epochs": 4, "isolation_lr": 0.05, "recovery_epochs": 1,
                    "recovery_lr": 0.05, "unlearning_epochs": 1, "cache_stages": True},
        "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1, "checkpoint_every_s": 0},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "save_model": False},
    }

    def run(count: str):
        raw = copy.deepcopy(base)
        raw["defense"]["isolation_count"] = count
        if count == "auto":  # nothing can stand apart, nor pass as the fixed share's fallback:
            # the zero-isolated path through the cache
            raw["defense"]["isolation_spreads"] = 1e6
            raw["defense"]["min_separation"] = 1e6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_experiment(build_experiment(raw), RunStore(tmp_path / "runs"))

    fixed = run("fixed")
    auto = run("auto")
    iso = auto.metrics["isolation"]
    assert iso["scores_hit"] == 1.0 and iso["stage_hit"] == 0.0
    assert auto.json("stages")["scored"]["key"] == fixed.json("stages")["scored"]["key"]
    assert auto.json("stages")["isolated"]["key"] != fixed.json("stages")["isolated"]["key"]
    assert iso["iso_count"] == 0 and iso["iso_weak"] == 0 and "unlearning" not in auto.metrics
    again = run("auto")
    assert again.metrics["isolation"]["stage_hit"] == 1.0
    assert again.metrics["isolation"]["iso_count"] == 0 and again.metrics["isolation"]["iso_weak"] == 0
    assert "unlearning" not in again.metrics


def test_the_threshold_counts_examples_more_than_six_spreads_down():
    """The threshold rules' cut: 6 pooled spreads (clean tails reached 5.9 on the CIFAR-10 slice)."""
    s, y = clean_scores()
    med = float(s.median())
    mad = float((s - s.median()).abs().median())
    s[:10] = med - 5.0 * mad  # within a clean tail's reach: not taken
    s[10:20] = med - 7.0 * mad
    d = decide_count(s, y, "threshold")
    assert set(d.indices.tolist()) >= set(range(10, 20)) and not set(d.indices.tolist()) & set(range(10))


def test_the_report_of_a_run_that_isolated_nothing_says_so(tmp_path):
    """``abl report`` on an ``auto`` run with no backdoor evidence: one plain sentence, not
    "0 examples were isolated; the picture shows it", and the evidence flag as yes/no."""
    from abl.experiment import build_experiment, run_experiment
    from abl.report import write_report
    from abl.store import RunStore

    raw = {"name": "clean-auto", "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 8},
           "defense": {"name": "abl", "isolation_count": "auto", "recovery_epochs": 1, "unlearning_epochs": 1},
           "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1}}
    store = RunStore(tmp_path / "runs")
    rec = run_experiment(build_experiment(raw), store)
    assert rec.metrics["isolation"]["iso_count"] == 0
    text = write_report(store, [rec.run_id], tmp_path / "report").read_text()
    assert "No example was isolated: nothing stood apart from the rest (no backdoor evidence)" in text
    assert "0 examples were isolated" not in text
    assert "Backdoor evidence" in text


def test_auto_falls_back_to_the_fixed_share_only_when_its_evidence_is_strong(monkeypatch):
    """Blend 5% on the CIFAR-10 slice: learned, but no label's scores split in two, so the
    rule isolated none (ASR 99.6%) while the lowest 1% held 49 poisons of 50 (separation
    9.1, one label). ``auto`` then takes the lowest ``isolation_rate`` if the weak-evidence
    test passes, and still nothing when the tail is spread over labels (every clean run)."""
    import abl.defenses.abl as ablmod
    from abl.defenses import DEFENSES

    s, y = clean_scores(2000)
    planted = torch.arange(0, 200, 10)  # 20 examples = 1% of 2,000, all of label 0
    s[planted] = -40.0
    none = decide_count(s, y)  # the rule's "no backdoor evidence", forced below
    none.indices = torch.empty(0, dtype=torch.long)
    monkeypatch.setattr(ablmod, "decide_count", lambda *a, **k: none)
    abl = DEFENSES.create({"name": "abl"})
    isolated, _ = abl.isolate(s, y)
    assert sorted(isolated.tolist()) == sorted(planted.tolist())
    assert abl.count_decision.rule == "fixed_fallback" and abl.count_decision.evidence
    spread = y.clone()
    spread[planted] = torch.arange(20) % 4  # the same tail over four labels: not one backdoor
    isolated, _ = abl.isolate(s, spread)
    assert len(isolated) == 0 and not abl.count_decision.evidence
    s[planted] = -2.5  # one label, but not apart from the clean tail
    isolated, _ = DEFENSES.create({"name": "abl"}).isolate(s, y)
    assert len(isolated) == 0


# -- the second look after recovery (``recheck``) ------------------------------------------

def _recovery_losses(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with np.load(FIXTURES / f"recovery_losses_{name}.npz", allow_pickle=False) as f:
        return (torch.from_numpy(f["losses"]).float(), torch.from_numpy(f["labels"]).long(),
                torch.from_numpy(f["poison_mask"]))


def test_rejected_examples_concentrated_in_one_label_are_taken():
    from abl.isolation_count import rejected_rule

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(5000) % 10
    losses = (torch.randn(5000, generator=gen) * 0.3 + 0.5).abs()
    planted = torch.arange(0, 400, 10)  # 40 examples of label 0 the model rejects
    losses[planted] = 6.0 + torch.rand(40, generator=gen)
    everyone = torch.ones(5000, dtype=torch.bool)
    d = rejected_rule(losses, y, everyone)
    assert d.labels == [0] and sorted(d.indices.tolist()) == sorted(planted.tolist())
    assert bool((losses[d.indices][1:] <= losses[d.indices][:-1]).all()), "most rejected first"
    # the isolated set's labels bound it: a backdoor found in label 3 adds nothing from 0
    assert rejected_rule(losses, y, everyone, allowed=[3]).count == 0
    assert rejected_rule(losses, y, everyone, allowed=[0, 3]).count == 40
    # examples already isolated are not candidates
    assert rejected_rule(losses, y, ~torch.isin(torch.arange(5000), planted)).count == 0
    # the same 40 spread over the labels are label noise, not a backdoor
    spread = torch.arange(40) * 101  # labels 0-9, four each
    noisy = (torch.randn(5000, generator=gen) * 0.3 + 0.5).abs()
    noisy[spread] = 6.0 + torch.rand(40, generator=gen)
    assert rejected_rule(noisy, y, everyone).count == 0
    # a class the model has barely learned sits high as a whole: slow, not a backdoor
    slow = (torch.randn(5000, generator=gen) * 0.3 + 0.5).abs()
    slow[y == 5] = 3.0 + (torch.randn(500, generator=gen) * 0.3).abs()
    assert rejected_rule(slow, y, everyone).count == 0


def test_the_recovered_models_rejections_on_stored_runs():
    """The last recovery epoch's training losses of stored runs of the default ABL
    (tests/fixtures/README.md). CIFAR-10 slice at 1% poisoning: the isolation found nothing
    (the backdoor was learned late), the recovered model rejects most poisons' labels. At
    BadNets 0.5% (not learned) and with no attack nothing is taken, where a pooled
    threshold at 4 spreads took 77 clean birds. Clean digits with the demo's schedule: the
    model fits nearly everything, so 6 spreads above a label's level is a loss of a few
    hundredths; without the floor of a chance-level loss 107 clean digits would go."""
    from abl.isolation_count import REJECTED_SPREADS, rejected_rule, shifted_excess_rule

    assert REJECTED_SPREADS == 6.0
    for name, measured in (("badnets1", (38, 29)), ("trojan1", (38, 31))):
        losses, y, mask = _recovery_losses(name)
        d = rejected_rule(losses, y, torch.ones(len(y), dtype=torch.bool))
        assert d.labels == [0], name
        assert (d.count, int(mask[d.indices].sum())) == measured, name
    for name in ("badnets05", "clean", "digits_clean"):
        losses, y, _ = _recovery_losses(name)
        assert rejected_rule(losses, y, torch.ones(len(y), dtype=torch.bool)).count == 0, name
    losses, y, _ = _recovery_losses("badnets05")
    assert decide_count(-losses, y, "label_excess", spreads=4.0).labels == [2]  # the looser one's birds
    losses, y, _ = _recovery_losses("digits_clean")
    assert shifted_excess_rule(-losses, y).count == 107  # the same threshold without the floor


def test_recheck_is_off_in_the_papers_presets():
    from abl.defenses import DEFENSES

    for preset in ("paper", "official"):
        assert DEFENSES.create({"name": "abl", "preset": preset}).recheck is False


def test_abl_recheck_adds_the_rejected_examples_of_the_isolated_label():
    """``run_recheck`` on a recovery's loss record: the rejected examples of ``D_c`` in the
    isolated set's label are added, those of another label are not, and nothing already
    isolated is taken twice."""
    from types import SimpleNamespace

    from abl.defenses import DEFENSES

    gen = torch.Generator().manual_seed(0)
    n = 5000
    y = torch.arange(n) % 10
    mask = torch.zeros(n, dtype=torch.bool)
    last = (torch.randn(n, generator=gen) * 0.3 + 0.5).abs()
    in_zero = torch.arange(0, 400, 10)  # 40 rejected of label 0, 30 of them poisons
    last[in_zero] = 6.0 + torch.rand(40, generator=gen)
    mask[in_zero[:30]] = True
    in_seven = torch.arange(7, 407, 10)  # 40 rejected of label 7: not the isolated set's label
    last[in_seven] = 6.0 + torch.rand(40, generator=gen)
    record = torch.stack([torch.full((n,), float("nan")), last])
    isolated = torch.arange(1000, 1100, 10)  # ten isolated, all label 0, trained in recovery too
    record[1, isolated] = 7.0  # (``recovery_data: full``): rejected, but already isolated
    lookup = torch.zeros(n, dtype=torch.bool)
    lookup[isolated] = True
    engine = SimpleNamespace(loss_matrix=lambda: record, device=torch.device("cpu"),
                             data=SimpleNamespace(labels=y, poison_mask=mask))
    abl = DEFENSES.create({"name": "abl", "recheck": True})
    added, m = abl.run_recheck(engine, lookup, isolated)
    assert sorted(added.tolist()) == sorted(in_zero.tolist())
    assert m["recheck_count"] == 40 and m["recheck_precision"] == 0.75
    assert abl.recheck_decision.labels == [0]
    # with nothing isolated every label may add, and every example is a candidate
    added, _ = abl.run_recheck(engine, torch.zeros(n, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert sorted(added.tolist()) == sorted(in_zero.tolist() + in_seven.tolist() + isolated.tolist())


def test_a_poison_shoulder_is_isolated_and_clean_labels_are_not():
    """The demo's isolation scores at two torch threads (tests/fixtures/README.md): the
    poisons' component is a shoulder of label 0 (Ashman's D 1.81), not a second peak, 5.2
    spreads below the median. At D > 2 the rule took none and the demo kept its backdoor
    (ASR 97.0%); at D > 1.5 it takes the shoulder. The clean run's labels stay out."""
    from abl import isolation_count as ic

    with np.load(FIXTURES / "isolation_scores_demo_t2.npz", allow_pickle=False) as f:
        s, y, mask = (torch.from_numpy(f[k]) for k in ("scores", "labels", "poison_mask"))
    d = decide_count(s.float(), y.long())
    assert d.labels == [0]
    tp = int(mask[d.indices].sum())
    assert d.count == 75 and tp == 74
    with np.load(FIXTURES / "isolation_scores_clean.npz", allow_pickle=False) as f:
        clean = decide_count(torch.from_numpy(f["scores"]).float(), torch.from_numpy(f["labels"]).long())
    assert clean.count == 0
    assert ic.MIXTURE_MIN_D == 1.5

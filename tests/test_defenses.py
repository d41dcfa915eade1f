"""Contract tests over every registered defense, and ABL's presets and phases."""

from __future__ import annotations

import pytest
import torch

from abl.attacks import ATTACKS
from abl.data import DATASETS
from abl.defenses import DEFENSES
from abl.defenses.abl import ABL, PRESETS
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.models import MODELS

# Short settings per defense; a defense registered without an entry here fails the
# contract test below, so every new defense gets the same checks.
SHORT = {
    "none": {"epochs": 3, "lr": 0.05},
    "clean": {"epochs": 3, "lr": 0.05},
    "detect": {"backdoor": {"epochs": 2, "lr": 0.05}, "detector": {"name": "spectral_signatures"}, "rate": 0.05},
    "fine_pruning": {"backdoor": {"epochs": 2, "lr": 0.05}, "epochs": 1},
    "neural_cleanse": {"backdoor": {"epochs": 2, "lr": 0.05}, "steps": 2, "batches_per_step": 2},
    "mcr": {"backdoor": {"epochs": 2, "lr": 0.05}, "finetune_epochs": 1, "epochs": 2, "points": 3},
    "nad": {"backdoor": {"epochs": 2, "lr": 0.05}, "teacher_epochs": 1, "epochs": 1, "betas": [100.0, 100.0, 100.0]},
    # a fixed count: these tiny runs test the stages' mechanics, which need an isolated set
    # (``auto`` isolates none on 2 isolation epochs; its own tests: test_isolation_count.py)
    "abl": {
        "isolation_count": "fixed",
        "isolation_epochs": 2,
        "isolation_lr": 0.02,
        "recovery_epochs": 2,
        "recovery_lr": 0.05,
        "unlearning_epochs": 2,
        "unlearning_lr": 0.001,
    },
}


@pytest.fixture(scope="module")
def digits():
    splits = DATASETS.create({"name": "digits"}).load()
    attack = ATTACKS.create({"name": "badnets", "rate": 0.1})
    attack.setup(splits.image_size, splits.num_classes)
    return splits, attack.poison(splits.train), attack.triggered_test(splits.test)


def engine_for(digits) -> Engine:
    splits, data, trig = digits
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn", "width": 8}).build(10, splits.image_size)
    return Engine(model, data, splits.test, trig, TrainConfig(progress=False, batch_size=128, eval_every=0), seed=0)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_contract(name, digits):
    assert name in SHORT, f"add short settings for defense '{name}' to SHORT"
    defense = DEFENSES.create({"name": name, **SHORT[name]})
    engine = engine_for(digits)
    result = defense.run(engine)
    final = result.metrics["final"]
    assert {"clean_acc", "asr", "robust_acc"} <= set(final)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for k, v in final.items() if k not in ("iso_count", "iso_separation"))
    assert len(engine.history) == defense.total_epochs()
    assert engine.loss_matrix().shape == (defense.total_epochs(), len(engine.data))
    if result.isolated is not None:
        assert result.isolated.dtype == torch.long and len(result.isolated) == len(torch.unique(result.isolated))
        assert bool((result.isolated_losses[1:] >= result.isolated_losses[:-1]).all()), "isolated lowest loss first"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_is_deterministic(name, digits):
    runs = []
    for _ in range(2):
        engine = engine_for(digits)
        DEFENSES.create({"name": name, **SHORT[name]}).run(engine)
        runs.append(engine.loss_matrix())
    assert torch.allclose(runs[0], runs[1], equal_nan=True)


def test_abl_phases_and_subsets(digits):
    engine = engine_for(digits)
    defense = DEFENSES.create({"name": "abl", **SHORT["abl"], "isolation_rate": 0.05})
    result = defense.run(engine)
    phases = [h["phase"] for h in engine.history]
    assert phases == ["isolation"] * 2 + ["recovery"] * 2 + ["unlearning"] * 2
    losses = engine.loss_matrix()
    iso = result.isolated
    assert len(iso) == int(len(engine.data) * 0.05)
    # recovery trains on D_c only: isolated examples are never seen there
    assert bool(losses[2:4, iso].isnan().all())
    # GGA: every batch pairs D_b with D_c, so both are trained in unlearning, except the
    # fifth of D_b held out to check the unlearning on suspects it never saw
    unlearned, held = defense.split_holdout(iso, engine.seed)
    assert len(held) == round(0.2 * len(iso)) and len(unlearned) + len(held) == len(iso)
    assert not set(held.tolist()) & set(unlearned.tolist())
    assert bool(losses[4:, unlearned].isfinite().all())
    assert bool(losses[4:, held].isnan().all())
    assert all("heldout_fit" in h for h in engine.history[4:])
    unl = result.metrics["unlearning"]
    assert unl["iso_heldout_count"] == len(held) and 0 <= unl["iso_heldout_fit_after"] <= 1
    assert {"isolation", "recovery", "unlearning", "final"} <= set(result.metrics)
    assert 0 <= result.metrics["final"]["iso_precision"] <= 1


def test_abl_full_recovery_and_official_ascent(digits):
    engine = engine_for(digits)
    defense = DEFENSES.create({"name": "abl", "preset": "official", **SHORT["abl"], "recovery_data": "full"})
    result = defense.run(engine)
    losses = engine.loss_matrix()
    assert bool(losses[2:4].isfinite().all()), "recovery on the full set trains every example"
    unlearn = losses[4:]
    seen = unlearn.isfinite().any(0)
    assert set(seen.nonzero().squeeze(1).tolist()) == set(result.isolated.tolist()), "pure ascent visits D_b only"
    assert engine.history[0]["phase"] == "isolation"


def test_presets_are_complete_and_differ():
    paper, official = ABL(preset="paper"), ABL(preset="official")
    paper.validate()
    official.validate()
    for key in PRESETS["paper"]:
        assert getattr(paper, key) is not None and getattr(official, key) is not None
    assert (paper.isolation_epochs, official.isolation_epochs) == (20, 10)
    assert (paper.unlearning, official.unlearning) == ("gga", "ascent")
    assert (paper.unlearning_lr, official.unlearning_lr) == (0.0001, 0.0005)
    default = ABL()
    default.validate()
    assert default.preset == "default" and default.unlearning_epoch == "clean" and default.ranking == "trajectory"
    assert paper.total_epochs() == 100
    assert official.total_epochs() == 10 + 60 + 4


def test_explicit_values_win_over_preset():
    d = DEFENSES.create({"name": "abl", "preset": "official", "isolation_epochs": 7, "unlearning_lr": 0.01})
    assert d.isolation_epochs == 7 and d.unlearning_lr == 0.01 and d.isolation_loss == "flooding"


@pytest.mark.parametrize(
    "params, key",
    [({"isolation_lr": 0}, "defense.isolation_lr"), ({"unlearning_ceiling": -1}, "defense.unlearning_ceiling"), ({"preset": "x"}, "defense.preset")],
)
def test_abl_bad_values(params, key):
    with pytest.raises(ConfigError, match=key):
        DEFENSES.create({"name": "abl", **params})


def test_every_lr_and_epoch_count_is_used(digits):
    engine = engine_for(digits)
    DEFENSES.create(
        {"name": "abl", "isolation_count": "fixed", "isolation_epochs": 1, "isolation_lr": 0.03, "recovery_epochs": 2, "recovery_lr": 0.04,
         "recovery_milestones": [1], "unlearning_epochs": 3, "unlearning_lr": 0.002}
    ).run(engine)
    lrs = [round(h["lr"], 6) for h in engine.history]
    assert lrs == [0.03, 0.04, 0.004, 0.002, 0.002, 0.002]


def _bn_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize("mode", ["train", "fixed_stats", "frozen"])
def test_unlearning_batchnorm_mode(digits, mode):
    """``frozen`` and ``fixed_stats`` keep the running statistics of recovery through
    unlearning; ``train`` (the authors') updates them from the isolated-heavy batches."""
    engine = engine_for(digits)
    abl = DEFENSES.create({"name": "abl", **SHORT["abl"], "unlearning_epochs": 0, "unlearning_bn": mode})
    isolated, _, _ = abl.run_isolation(engine)
    lookup = torch.zeros(len(engine.data), dtype=torch.bool)
    lookup[isolated] = True
    abl.run_recovery(engine, lookup)
    before = _bn_stats(engine.model)
    abl.unlearning_epochs = 2
    abl.run_unlearning(engine, lookup)
    changed = any(not torch.equal(a, b) for a, b in zip(before, _bn_stats(engine.model)))
    assert changed == (mode == "train")
    assert engine.model.training, "the model is left in train mode for whatever trains next"
    bns = [m for m in engine.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(m.training and m.momentum == 0.1 for m in bns), "BatchNorm is restored after the phase"


def test_unlearning_epoch_over_clean_visits_every_clean_example(digits):
    engine = engine_for(digits)
    defense = DEFENSES.create({"name": "abl", **SHORT["abl"], "unlearning_epochs": 1, "unlearning_epoch": "clean"})
    result = defense.run(engine)
    seen = engine.loss_matrix()[-1].isfinite()
    _, held = defense.split_holdout(result.isolated, engine.seed)
    seen[held] = True
    assert bool(seen.all()), "a pass over D_c (paired with D_b) trains every example but the held-out ones once"
    engine2 = engine_for(digits)
    DEFENSES.create({"name": "abl", **SHORT["abl"], "unlearning_epochs": 1, "unlearning_epoch": "isolated"}).run(engine2)
    seen2 = engine2.loss_matrix()[-1].isfinite()
    # a pass over the unlearned part of D_b: its batches plus one paired D_c batch each
    n_all = len(result.isolated)
    n_iso = n_all - len(held)
    assert int(seen2.sum()) == n_iso + min(-(-n_iso // 128) * 128, len(engine2.data) - n_all)
    with pytest.raises(ConfigError, match="defense.unlearning_epoch"):
        DEFENSES.create({"name": "abl", "unlearning": "ascent", "unlearning_epoch": "clean"})
    # the default preset's pass over D_c becomes a pass over D_b when ascent is asked for
    assert DEFENSES.create({"name": "abl", "unlearning": "ascent"}).unlearning_epoch == "isolated"


def test_nesterov_and_batch_size_reach_every_phase(digits, monkeypatch):
    engine = engine_for(digits)
    made: list[bool] = []
    real = torch.optim.SGD.__init__

    def spy(self, params, **kw):
        made.append(kw.get("nesterov", False))
        real(self, params, **kw)

    monkeypatch.setattr(torch.optim.SGD, "__init__", spy)
    defense = DEFENSES.create({"name": "abl", "preset": "official", **SHORT["abl"], "batch_size": 40})
    defense.run(engine)
    assert made and all(made), "the official preset uses Nesterov in every optimizer it creates"
    # isolation is unshuffled at batch 40: losses of one epoch come from ceil(N / 40) steps
    iso_epochs = [h for h in engine.history if h["phase"] == "isolation"]
    assert len(iso_epochs) == 2
    n = len(engine.data)
    steps = -(-n // 40)
    assert steps != -(-n // 128)  # the check below could not tell the two apart otherwise
    from abl.data.loader import TensorLoader

    assert len(TensorLoader(engine.data.images, engine.data.labels, defense.batch_size)) == steps


def test_trajectory_ranking_is_the_mean_log_loss_of_the_isolation_record(digits):
    engine = engine_for(digits)
    abl = DEFENSES.create({"name": "abl", **SHORT["abl"], "isolation_epochs": 3, "rank_epochs": 2})
    isolated, scores, stage = abl.run_isolation(engine)
    record = engine.loss_matrix()[1:3]
    expected = record.clamp_min(1e-12).log().mean(0)
    k = len(isolated)
    assert torch.equal(isolated.cpu(), torch.argsort(expected, stable=True)[:k])
    assert torch.allclose(scores.cpu(), expected[isolated.cpu()])
    assert {"iso_separation", "iso_top_label_share", "iso_weak", "stage_s", "rank_s"} <= set(stage)


def test_eval_ranking_averages_the_eval_mode_losses(digits, monkeypatch):
    engine = engine_for(digits)
    calls: list[torch.Tensor] = []
    real = engine.per_example_loss

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out.clone())
        return out

    monkeypatch.setattr(engine, "per_example_loss", spy)
    abl = DEFENSES.create({"name": "abl", "preset": "paper", **SHORT["abl"], "isolation_epochs": 3, "rank_epochs": 2})
    isolated, scores, _ = abl.run_isolation(engine)
    assert len(calls) == 2, "one eval-mode ranking pass per ranked epoch"
    expected = torch.stack(calls).mean(0)
    assert torch.equal(isolated, torch.argsort(expected, stable=True)[: len(isolated)])


def test_weak_evidence_is_flagged_on_clean_data(digits):
    """Without poisons the lowest 1% is a clean tail: a fixed-count run must say the evidence
    is weak (``auto`` isolates nothing there: tests/test_isolation_count.py)."""
    from abl.data.types import PoisonedSet

    splits, data, trig = digits
    clean = PoisonedSet(splits.train.images, splits.train.labels, splits.train.labels.clone(),
                        torch.zeros(len(splits.train), dtype=torch.bool))
    torch.manual_seed(0)
    model = MODELS.create({"name": "small_cnn", "width": 16}).build(10, splits.image_size)
    engine = Engine(model, clean, splits.test, None, TrainConfig(progress=False, batch_size=128, eval_every=0), seed=0)
    abl = DEFENSES.create({"name": "abl", "isolation_epochs": 20, "isolation_count": "fixed"})
    with pytest.warns(UserWarning, match="weak isolation evidence"):
        _, _, stage = abl.run_isolation(engine)
    assert stage["iso_weak"] == 1.0 and stage["iso_separation"] < abl.min_separation


def test_isolated_set_spread_over_classes_is_weak_evidence():
    """A set that stands far apart but is spread over classes is not one backdoor's poisons:
    CBA at full scale isolated 0% poisons, 51% of one label, at separation 6.01 (benchmarks/README.md)."""
    from abl.defenses.abl import isolation_evidence

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2000, generator=gen)
    isolated = torch.arange(20)
    scores[isolated] -= 30.0  # far below the rest: the separation test passes either way
    abl = DEFENSES.create({"name": "abl"})
    one_label = torch.randint(0, 10, (2000,), generator=gen)
    one_label[isolated] = 3
    strong = isolation_evidence(scores, isolated, one_label)
    assert strong["iso_top_label_share"] == 1.0 and abl.weak_evidence(strong) == []
    spread = one_label.clone()
    spread[isolated] = torch.arange(20) % 2  # two labels, half each
    weak = isolation_evidence(scores, isolated, spread)
    assert weak["iso_separation"] > abl.min_separation and weak["iso_top_label_share"] == 0.5
    assert any("share one label" in why for why in abl.weak_evidence(weak))
    assert DEFENSES.create({"name": "abl", "min_label_share": 0.0}).weak_evidence(weak) == []
    with pytest.raises(ConfigError, match="min_label_share"):
        DEFENSES.create({"name": "abl", "min_label_share": 1.5})


def test_auto_count_is_not_flagged_by_the_fixed_counts_separation_cutoff():
    """``auto`` isolates only what passes its own separation test; the fixed count's
    ``min_separation`` must not flag that set again (the demo: 96.7% precision at 5.9)."""
    evidence = {"iso_separation": 5.9, "iso_top_label_share": 1.0}
    assert DEFENSES.create({"name": "abl"}).weak_evidence(evidence) == []
    fixed = DEFENSES.create({"name": "abl", "isolation_count": "fixed"})
    assert any("spreads" in why for why in fixed.weak_evidence(evidence))
    spread = {"iso_separation": 9.0, "iso_top_label_share": 0.5}  # the label test still applies
    assert any("share one label" in why for why in DEFENSES.create({"name": "abl"}).weak_evidence(spread))


def test_unlearning_reports_whether_it_cut_the_isolated_link(digits):
    """No ground truth needed: the model's fit on the isolated examples' own labels, before
    and after unlearning; a run whose unlearning left them fitted warns and flags it."""
    engine = engine_for(digits)
    abl = DEFENSES.create({"name": "abl", **SHORT["abl"], "unlearning_epochs": 0})
    isolated, _, _ = abl.run_isolation(engine)
    lookup = torch.zeros(len(engine.data), dtype=torch.bool)
    lookup[isolated] = True
    abl.run_recovery(engine, lookup)
    unlearned, held = abl.split_holdout(isolated, engine.seed)
    engine.model.eval()
    expected = [float((engine.model(engine.data.images[i].float() / 255).argmax(1) == engine.data.labels[i]).float().mean())
                for i in (unlearned, held)]
    engine.model.train()
    abl.unlearning_epochs, abl.unlearning_lr = 1, 1e-7  # far too weak to move anything
    with pytest.warns(UserWarning, match="did not cut the held-out suspects"):
        m = abl.run_unlearning(engine, lookup)
    assert (m["iso_fit_before"], m["iso_heldout_fit_before"]) == pytest.approx(expected)
    assert m["iso_heldout_fit_after"] > 0.5 and m["unlearn_weak"] == 1.0
    abl.unlearning_epochs, abl.unlearning_lr = 20, 0.01
    strong = abl.run_unlearning(engine, lookup)
    assert strong["iso_heldout_fit_after"] < m["iso_heldout_fit_after"] and strong["unlearn_weak"] == 0.0
    assert strong["iso_fit_after"] < m["iso_fit_after"]


def test_heldout_selection_keeps_the_epoch_that_fits_the_suspects_least(digits, monkeypatch):
    """The default keeps the unlearning epoch whose model fits the held-out suspects least,
    restores its weights, reports that model, and stops ``patience`` epochs after it."""
    engine = engine_for(digits)
    abl = DEFENSES.create({"name": "abl", **SHORT["abl"], "unlearning_epochs": 0, "unlearning_patience": 3})
    isolated, _, _ = abl.run_isolation(engine)
    lookup = torch.zeros(len(engine.data), dtype=torch.bool)
    lookup[isolated] = True
    abl.run_recovery(engine, lookup)
    _, held = abl.split_holdout(isolated, engine.seed)
    # a scripted held-out fit per epoch: best at epoch 2, then a relapse
    script = iter([0.9, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9])
    real_fit = engine.train_fit
    snapshots: list[dict] = []

    def scripted(index, *data):
        correct, losses = real_fit(index, *data)
        if len(index) == len(held) and torch.equal(index.cpu(), held.cpu()) and engine.history[-1]["phase"] == "unlearning":
            if len(snapshots) < len(engine.history) - n0:  # once per epoch (the watch), not the final check
                snapshots.append({k: v.clone() for k, v in engine.model.state_dict().items()})
                f = next(script)
                return torch.arange(len(index)) < round(f * len(index)), losses
        return correct, losses

    monkeypatch.setattr(engine, "train_fit", scripted)
    n0 = len(engine.history)
    abl.unlearning_epochs = 10
    m = abl.run_unlearning(engine, lookup)
    assert m["unlearn_epochs_run"] == 5, "stops 3 epochs after the best (epoch 2)"
    assert m["unlearn_epoch_kept"] == 2
    kept = snapshots[1]
    assert all(torch.equal(v, kept[k]) for k, v in engine.model.state_dict().items()), "epoch 2's weights restored"
    assert m["clean_acc"] == pytest.approx(engine.evaluate(full=True)["clean_acc"]), "metrics of the kept model"
    expected = [round(f * len(held)) / len(held) for f in (0.9, 0.2, 0.5, 0.6, 0.7)]
    assert [h["heldout_fit"] for h in engine.history[n0:]] == pytest.approx(expected), "the per-epoch curve"


def test_holdout_options_are_validated_and_too_few_suspects_warn(digits):
    with pytest.raises(ConfigError, match="defense.unlearning_select"):
        DEFENSES.create({"name": "abl", "unlearning_holdout": 0.0, "unlearning_select": "heldout"})
    with pytest.raises(ConfigError, match="defense.unlearning_holdout"):
        DEFENSES.create({"name": "abl", "unlearning_holdout": 1.0})
    with pytest.raises(ConfigError, match="defense.unlearning_patience"):
        DEFENSES.create({"name": "abl", "unlearning_patience": -1})
    paper = DEFENSES.create({"name": "abl", "preset": "paper"})
    assert (paper.unlearning_holdout, paper.unlearning_select, paper.unlearning_patience) == (0.0, "last", 0)
    engine = engine_for(digits)
    abl = DEFENSES.create({"name": "abl", **SHORT["abl"], "isolation_rate": 0.001, "unlearning_epochs": 0})
    isolated, _, _ = abl.run_isolation(engine)
    assert len(isolated) == 1
    lookup = torch.zeros(len(engine.data), dtype=torch.bool)
    lookup[isolated] = True
    abl.unlearning_epochs = 1
    with pytest.warns(UserWarning, match="too few to hold"):
        m = abl.run_unlearning(engine, lookup)
    assert "iso_heldout_fit_after" not in m and "unlearn_epoch_kept" not in m
    # a handful held out: the run says its check is coarse
    engine = engine_for(digits)
    abl = DEFENSES.create({"name": "abl", **SHORT["abl"], "unlearning_epochs": 1})
    with pytest.warns(UserWarning, match=r"rests on 3 suspects only"):
        result = abl.run(engine)
    assert result.metrics["unlearning"]["iso_heldout_count"] == 3


@pytest.mark.parametrize("ceiling", [None, 4.0])
@pytest.mark.parametrize("which", ["mixed", "all_clean", "all_isolated"])
def test_gga_objective_is_clean_mean_minus_capped_isolated_mean(ceiling, which):
    from abl.defenses.abl import gga_objective

    lookup = torch.tensor([True, False, True, False, False, True])
    idx = {"mixed": torch.tensor([0, 1, 2, 3, 4, 5, 1]), "all_clean": torch.tensor([1, 3, 4]),
           "all_isolated": torch.tensor([0, 2, 5])}[which]
    losses = torch.tensor([0.5, 1.0, 5.0, 2.0, 3.0, 0.1, 1.5][: len(idx)], requires_grad=True)
    iso = lookup[idx]
    clean = losses[~iso].mean() if (~iso).any() else 0.0
    bad = losses[iso]
    if ceiling is not None:
        bad = torch.where(bad.detach() < ceiling, bad, torch.zeros_like(bad))
    expected = clean - (bad.mean() if iso.any() else 0.0)
    got = gga_objective(lookup, ceiling)(losses, idx)
    assert float(got) == pytest.approx(float(expected))
    (g_got,) = torch.autograd.grad(got, losses)
    losses2 = losses.detach().clone().requires_grad_()
    iso_f = iso.float()
    ref = (losses2 * (1 - iso_f)).sum() / max(1.0, float((1 - iso_f).sum()))
    capped = losses2 if ceiling is None else torch.where(losses2.detach() < ceiling, losses2, torch.zeros_like(losses2))
    ref = ref - (capped * iso_f).sum() / max(1.0, float(iso_f.sum()))
    (g_ref,) = torch.autograd.grad(ref, losses2)
    assert torch.allclose(g_got, g_ref)

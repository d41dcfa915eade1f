"""Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li & Ma, NeurIPS 2021, arXiv 2110.11571).

Stage 1 trains with local gradient ascent (LGA), which holds every example's loss near
``gamma``: backdoor examples, learned far faster than clean ones, reach it first and
sit there, so at the turning epoch the fraction ``isolation_rate`` with the lowest loss
is isolated as ``D_b``. Stage 2 recovers clean accuracy on the rest, then unlearns the
backdoor by gradient ascent on ``D_b``.

Two presets: ``paper`` (appendix A.3: 20 isolation epochs, per-example LGA, 60 recovery
epochs with augmentation, 20 epochs of joint ``L_GGA = mean(D_c) - mean(D_b)`` at lr 1e-4)
and ``official`` (the authors' code: 10 isolation epochs of batch-mean flooding,
unshuffled, no augmentation; 60 epochs of fine-tuning on ``D_c``; 5 epochs of pure ascent
on ``D_b`` at lr 5e-4 with the momentum carried over). Every field left unset takes the
preset's value; any field set explicitly wins, and the resolved values are recorded.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, fields
from typing import Literal

import torch

from abl.config import check
from abl.data.loader import AugmentConfig
from abl.defenses.base import DEFENSES, METRIC_KEYS, Defense, DefenseResult, phase_metrics
from abl.engine import Engine, Objective
from abl.metrics import isolation_metrics

#: appendix A.3 of the paper. The isolation loss is LGA on the batch mean: the form of the
#: authors' code, and the only one that comes near the paper's Table 7 at full scale (the
#: per-example form isolated 0 of 500 BadNets poisons on full CIFAR-10; see ``lga_objective``).
_PAPER: dict[str, object] = dict(
    isolation_loss="lga_batch",
    isolation_epochs=20,
    isolation_lr=0.1,
    isolation_shuffle=True,
    ranking="eval",
    rank_epochs=1,
    recovery_epochs=60,
    recovery_lr=0.1,
    recovery_milestones=[40],
    recovery_data="clean",
    recovery_augment=True,
    recovery_cutout=9,
    recovery_cutout_span="length",
    unlearning="gga",
    unlearning_epochs=20,
    unlearning_lr=0.0001,
    unlearning_epoch="isolated",
    unlearning_bn="train",
    unlearning_holdout=0.0,
    unlearning_select="last",
    unlearning_patience=0,
    carry_momentum=False,
)

#: the authors' code (bboylyg/ABL), written as its differences from the paper; the test
#: ``tests/test_presets.py`` holds each value against the file and line it comes from.
_OFFICIAL_DIFFERS: dict[str, object] = dict(
    isolation_loss="flooding",
    isolation_epochs=10,
    isolation_shuffle=False,
    batch_size=64,
    nesterov=True,
    recovery_cutout=3,
    recovery_cutout_span="authors",
    unlearning="ascent",
    # their loop runs 5 epochs, but the first only evaluates: 4 passes of ascent
    unlearning_epochs=4,
    unlearning_lr=0.0005,
    carry_momentum=True,
)

#: what we ship as the default, chosen by measurement (benchmarks/README.md, "Choosing the
#: default"; BadNets on a 5,000-image CIFAR-10 slice, the same recovered model unlearned
#: eight ways): batch-mean LGA as in the paper preset; ranking by the mean log training loss
#: over the last half of the isolation epochs (100% precision, separation 8.3, against 98%
#: for one eval-mode ranking and 2% for per-example LGA); GGA over D_c, every batch of D_c
#: paired with as many isolated examples, at lr 1e-3 (ASR 100% -> 0.3% in 5 epochs, CA -1.8
#: points; the paper's 20 steps at 1e-4 left 94%, the authors' ascent 99%, frozen BatchNorm
#: 100% in every variant). An isolated example stops being ascended once its loss passes 4:
#: unbounded, the ascent collapsed the digits to 10% CA; at 10 it cost 5.1 points of CIFAR
#: CA against 1.2 at 3; at 3 the digits backdoor crept back from the poisons left in D_c
#: (11% ASR after 15 epochs), at 4 it stayed at 0-2% for epochs 6-11 (two seeds).
#: At full scale (H200, 50,000 images) the same GGA unlearned BadNets to ASR 9.2% by its
#: epoch 5 and then relapsed to 75.4% by epoch 20: the 1% isolated set leaves 90% of the
#: poisons in D_c, and each epoch's descent over D_c teaches the trigger again once the
#: ceiling has silenced the ascent. So the default keeps a fifth of D_b out of unlearning,
#: watches how well the model still fits those held-out suspects after every epoch, keeps
#: the epoch that fits them least and stops 5 epochs after it (benchmarks/README.md, "Full
#: scale").
_DEFAULT_DIFFERS: dict[str, object] = dict(
    ranking="trajectory",
    rank_epochs=0,
    unlearning_epoch="clean",
    unlearning_lr=0.001,
    unlearning_ceiling=4.0,
    unlearning_holdout=0.2,
    unlearning_select="heldout",
    unlearning_patience=5,
)

PRESETS: dict[str, dict[str, object]] = {
    "default": {**_PAPER, **_DEFAULT_DIFFERS},
    "paper": _PAPER,
    "official": {**_PAPER, **_OFFICIAL_DIFFERS},
}


def lga_objective(gamma: float) -> Objective:
    """Per-example LGA: ``mean(sign(l - gamma) * l)`` (one reading of the paper's Eq. 3).

    It holds every fitted example at ``gamma``, poisons and easy clean examples alike, so a
    ranking cannot tell them apart: on all 50,000 CIFAR-10 images (BadNets 10%, WRN-16-1,
    20 epochs at lr 0.1) it isolated 0 of 500 poisons (precision 0.0%), against 490 of 500
    for the batch-mean form (:func:`lga_batch_objective`). Kept as an option, never a preset.
    """

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (torch.sign(losses - gamma) * losses).mean()

    return objective


def lga_batch_objective(gamma: float) -> Objective:
    """The authors' variant: LGA on the batch-mean loss, ``sign(L - gamma) * L``."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mean = losses.mean()
        return torch.sign(mean - gamma) * mean

    return objective


def flooding_objective(level: float) -> Objective:
    """Flooding (Ishida et al., ICML 2020) on the batch mean: ``|L - b| + b``."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mean = losses.mean()
        return (mean - level).abs() + level

    return objective


def _ascent_term(bad: torch.Tensor, ceiling: float | None) -> torch.Tensor:
    """Mean loss of isolated examples to ascend; with a ``ceiling``, examples whose loss
    already exceeds it stop contributing (their backdoor link is already cut)."""
    if ceiling is None:
        return bad.mean()
    return torch.where(bad.detach() < ceiling, bad, torch.zeros_like(bad)).mean()


def gga_objective(isolated_lookup: torch.Tensor, ceiling: float | None = None) -> Objective:
    """Joint GGA: ``mean over D_c of l - mean over D_b of l`` within each paired batch."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # masked sums instead of boolean indexing and len(): no host sync per step on a GPU
        iso = isolated_lookup[idx].to(losses.dtype)
        n_bad = iso.sum()
        n_clean = iso.numel() - n_bad
        clean = (losses * (1 - iso)).sum() / n_clean.clamp_min(1)
        bad = losses if ceiling is None else torch.where(losses.detach() < ceiling, losses, torch.zeros_like(losses))
        return clean - (bad * iso).sum() / n_bad.clamp_min(1)

    return objective


def ascent_objective(ceiling: float | None = None) -> Objective:
    """Pure gradient ascent on the isolated examples (the authors' unlearning)."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -_ascent_term(losses, ceiling)

    return objective


#: below this many held-out suspects the unlearning check is coarse, and the run says so
MIN_FIRM_HOLDOUT = 10

ISOLATION_LOSSES = {"lga": lga_objective, "lga_batch": lga_batch_objective, "flooding": flooding_objective}


@DEFENSES.register("abl")
@dataclass
class ABL(Defense):
    """Anti-Backdoor Learning. Fields left ``None`` take the value of ``preset``.

    Parameters:
        preset: ``default`` (what we measured to work, see ``_DEFAULT_DIFFERS``),
            ``paper`` (appendix A.3) or ``official`` (the authors' code).
        gamma: LGA threshold / flooding level (0.5).
        isolation_rate: fraction ``p`` of the training set isolated as ``D_b`` (0.01).
        isolation_loss: ``lga_batch`` (LGA on the batch mean, every preset but
            ``official``), ``lga`` (per example: 0.0% precision at full scale, see
            :func:`lga_objective`) or ``flooding`` (the authors' default).
        isolation_epochs: the turning epoch ``T_te`` (paper 20, official 10).
        isolation_lr: learning rate before the turning epoch (0.1; GTSRB 0.01).
        isolation_shuffle: shuffle during isolation (the authors' loader does not; class-
            ordered datasets are shuffled once at load, see ``order_seed``).
        ranking: ``eval`` ranks by the eval-mode, un-augmented loss after the last
            ``rank_epochs`` isolation epochs (averaged; the paper and the authors rank once
            at the turning epoch); ``trajectory`` ranks by the mean log training loss of
            each example over the last ``rank_epochs`` isolation epochs, read from the
            loss record of the training batches (no extra pass): it scores how early and
            how far an example was fitted, which a single epoch's loss does not.
        rank_epochs: isolation epochs the ranking uses, the last ones (0: the last half,
            rounded up; the default preset's choice, so it follows ``isolation_epochs``).
        batch_size: batch size of every ABL phase (None: ``train.batch_size``).
        nesterov: Nesterov momentum in ABL's optimizers (None: ``train.nesterov``).
        recovery_epochs, recovery_lr, recovery_milestones, recovery_lr_factor: the middle
            stage (60 epochs at 0.1, x0.1 from its epoch 40; the appendix gives no schedule,
            this is the authors').
        recovery_data: ``clean`` trains on ``D_c`` only, ``full`` on every example (the
            appendix's wording; method.md discusses the ambiguity).
        recovery_augment, recovery_cutout, recovery_cutout_span: crop + flip + Cutout in
            the recovery stage only; Cutout 9 (paper) or the authors' ``Cutout(1, 3)``
            (``span: authors``: a 2x2 hole).
        unlearning: ``gga`` (joint ``mean(D_c) - mean(D_b)`` in every batch) or ``ascent``
            (``-mean(D_b)`` over ``D_b`` only, the authors').
        unlearning_epochs, unlearning_lr: paper 20 at 1e-4; official 4 at 5e-4.
        unlearning_epoch: what one unlearning epoch is: a pass over ``D_b`` (``isolated``,
            the authors' code: each ``D_b`` batch paired with as many ``D_c`` examples) or
            over ``D_c`` (``clean``: each ``D_c`` batch paired with as many ``D_b``
            examples, 99x more steps at p = 1%; ``gga`` only). The paper does not say.
        unlearning_bn: BatchNorm during unlearning: ``train`` (batch statistics, running
            statistics updated: the authors'), ``fixed_stats`` (batch statistics, running
            statistics kept from recovery) or ``frozen`` (running statistics used and kept).
        carry_momentum: keep the recovery optimizer's momentum into unlearning.
        unlearning_ceiling: an isolated example stops being ascended once its loss
            exceeds this (None or .inf: unbounded, as in the paper and the authors' code).
        unlearning_holdout: fraction of ``D_b`` (seeded) kept out of unlearning as a check:
            a model that still classifies these unseen suspects as their training labels has
            not cut the backdoor, whatever it does on the examples it was unlearned on
            (those it can simply memorise). 0 in ``paper`` and ``official``; 0.2 by default.
        unlearning_select: ``last`` keeps the model after the last unlearning epoch;
            ``heldout`` keeps the epoch whose model fits the held-out suspects least (ties:
            the higher mean held-out loss, capped at the ceiling) and restores it at the end.
        unlearning_patience: with ``heldout``, stop this many epochs after the best one
            (0: run every epoch).
        min_separation: the isolation evidence is flagged weak (metric ``iso_weak`` = 1, a
            warning, a line in the report) when ``iso_separation`` falls below this.
    """

    preset: Literal["default", "paper", "official"] = "default"
    gamma: float = 0.5
    isolation_rate: float = 0.01
    isolation_loss: Literal["lga", "lga_batch", "flooding"] | None = None
    isolation_epochs: int | None = None
    isolation_lr: float | None = None
    isolation_shuffle: bool | None = None
    ranking: Literal["eval", "trajectory"] | None = None
    rank_epochs: int | None = None
    batch_size: int | None = None
    nesterov: bool | None = None
    recovery_epochs: int | None = None
    recovery_lr: float | None = None
    recovery_milestones: list[int] | None = None
    recovery_lr_factor: float = 0.1
    recovery_data: Literal["clean", "full"] | None = None
    recovery_augment: bool | None = None
    recovery_cutout: int | None = None
    recovery_cutout_span: Literal["length", "authors"] | None = None
    unlearning: Literal["gga", "ascent"] | None = None
    unlearning_epochs: int | None = None
    unlearning_lr: float | None = None
    unlearning_epoch: Literal["isolated", "clean"] | None = None
    unlearning_bn: Literal["train", "fixed_stats", "frozen"] | None = None
    carry_momentum: bool | None = None
    unlearning_ceiling: float | None = None
    unlearning_holdout: float | None = None
    unlearning_select: Literal["last", "heldout"] | None = None
    unlearning_patience: int | None = None
    min_separation: float = 6.0

    def validate(self) -> None:
        from_preset = set()
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in PRESETS[self.preset]:
                setattr(self, f.name, copy.copy(PRESETS[self.preset][f.name]))
                from_preset.add(f.name)
        if self.unlearning == "ascent" and "unlearning_epoch" in from_preset:
            # pure ascent never visits D_c: a preset's pass over D_c means a pass over D_b here
            self.unlearning_epoch = "isolated"
        check(self.gamma >= 0, "defense.gamma", "must be >= 0")
        check(0 < self.isolation_rate < 1, "defense.isolation_rate", f"must be in (0, 1), got {self.isolation_rate}")
        check(self.isolation_epochs >= 1, "defense.isolation_epochs", "must be >= 1")  # type: ignore[operator]
        check(
            0 <= self.rank_epochs <= self.isolation_epochs,  # type: ignore[operator]
            "defense.rank_epochs",
            f"must be between 0 (the last half) and isolation_epochs ({self.isolation_epochs})",
        )
        check(self.batch_size is None or self.batch_size >= 1, "defense.batch_size", "must be >= 1 or null")
        check(self.recovery_epochs >= 0, "defense.recovery_epochs", "must be >= 0")  # type: ignore[operator]
        check(self.recovery_cutout >= 0, "defense.recovery_cutout", "must be >= 0")  # type: ignore[operator]
        check(self.unlearning_epochs >= 0, "defense.unlearning_epochs", "must be >= 0")  # type: ignore[operator]
        for name in ("isolation_lr", "recovery_lr", "unlearning_lr"):
            check(getattr(self, name) > 0, f"defense.{name}", "must be > 0")
        check(self.unlearning_ceiling is None or self.unlearning_ceiling > 0, "defense.unlearning_ceiling", "must be > 0")
        check(0 < self.recovery_lr_factor <= 1, "defense.recovery_lr_factor", "must be in (0, 1]")
        check(
            not (self.unlearning == "ascent" and self.unlearning_epoch == "clean"),
            "defense.unlearning_epoch",
            "'clean' (a pass over D_c) needs unlearning: gga; pure ascent never visits D_c",
        )
        check(0 <= self.unlearning_holdout < 1, "defense.unlearning_holdout", "must be in [0, 1)")  # type: ignore[operator]
        check(
            self.unlearning_select == "last" or self.unlearning_holdout > 0,  # type: ignore[operator]
            "defense.unlearning_select",
            "'heldout' needs unlearning_holdout > 0 (the suspects it checks the model on)",
        )
        check(self.unlearning_patience >= 0, "defense.unlearning_patience", "must be >= 0 (0: no early stop)")  # type: ignore[operator]
        check(self.min_separation >= 0, "defense.min_separation", "must be >= 0")

    def total_epochs(self) -> int:
        return int(self.isolation_epochs) + int(self.recovery_epochs) + int(self.unlearning_epochs)  # type: ignore[arg-type]

    def isolate(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest ``isolation_rate`` fraction of per-example ``scores``: (indices, scores),
        lowest first."""
        k = max(1, int(len(scores) * self.isolation_rate))
        order = torch.argsort(scores, stable=True)[:k]
        return order, scores[order]

    def _rank_count(self) -> int:
        """How many of the last isolation epochs the ranking uses."""
        return int(self.rank_epochs) or -(-int(self.isolation_epochs) // 2)  # type: ignore[arg-type]

    def _ranking_scores(self, engine: Engine, evals: list[torch.Tensor]) -> torch.Tensor:
        """Per-example isolation scores, lowest = most suspicious (see ``ranking``)."""
        if self.ranking == "eval":
            return torch.stack(evals).mean(0)
        k = self._rank_count()
        record = torch.stack(engine.example_losses[-k:]).to(engine.device)
        # log: an example fitted to 1e-4 is far more suspicious than one at 1e-2, which a
        # mean of raw losses (dominated by the early, high values) would hide
        return record.clamp_min(1e-12).log().mean(0)

    def run(self, engine: Engine) -> DefenseResult:
        metrics: dict[str, dict[str, float]] = {}
        isolated, scores, metrics["isolation"] = self.run_isolation(engine)
        iso_keys = {k: v for k, v in metrics["isolation"].items() if k.startswith("iso_")}
        lookup = torch.zeros(len(engine.data), dtype=torch.bool, device=engine.device)
        lookup[isolated] = True
        opt = None
        if self.recovery_epochs:
            opt, metrics["recovery"] = self.run_recovery(engine, lookup)
        if self.unlearning_epochs:
            metrics["unlearning"] = self.run_unlearning(engine, lookup, opt)
        # the last stage's figures: unlearning may have restored an earlier epoch's model
        last = metrics.get("unlearning") or metrics.get("recovery") or metrics["isolation"]
        metrics["final"] = {**{k: v for k, v in last.items() if k in METRIC_KEYS}, **iso_keys}
        return DefenseResult(metrics=metrics, isolated=isolated.cpu(), isolated_losses=scores.cpu())

    def _batch_size(self, engine: Engine) -> int:
        return int(self.batch_size or engine.cfg.batch_size)

    def run_isolation(self, engine: Engine) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Stage 1: train with the isolation loss, rank, isolate. Returns the isolated
        indices (most suspicious first), their scores and the stage's metrics."""
        t0 = time.perf_counter()
        # in the engine's state: a resumed run needs the ranking passes made before the stop
        evals: list[torch.Tensor] = engine.state.setdefault("isolation_evals", [])
        k = self._rank_count()
        first_rank = int(self.isolation_epochs) - k  # type: ignore[arg-type]

        def rank(e: int) -> None:
            if self.ranking == "eval" and e >= first_rank:
                evals.append(engine.per_example_loss())

        engine.run_phase(
            "isolation",
            epochs=self.isolation_epochs,  # type: ignore[arg-type]
            lr=self.isolation_lr,  # type: ignore[arg-type]
            objective=ISOLATION_LOSSES[self.isolation_loss](self.gamma),  # type: ignore[index]
            shuffle=bool(self.isolation_shuffle),
            after_epoch=rank,
            batch_size=self._batch_size(engine),
            nesterov=self.nesterov,
        )
        t_rank = time.perf_counter()
        scores = self._ranking_scores(engine, evals)
        isolated, isolated_scores = self.isolate(scores)
        rank_s = time.perf_counter() - t_rank
        iso = isolation_metrics(isolated, engine.data.poison_mask)
        evidence = isolation_evidence(scores, isolated, engine.data.labels)
        evidence["iso_weak"] = float(evidence["iso_separation"] < self.min_separation)
        if evidence["iso_weak"]:
            warnings.warn(
                f"ABL: weak isolation evidence: the isolated examples' scores sit only "
                f"{evidence['iso_separation']:.1f} spreads below the rest (min_separation "
                f"{self.min_separation}); they may be clean examples, and unlearning them costs "
                "clean accuracy. Check the loss curves in the report.",
                stacklevel=2,
            )
        stage = {**phase_metrics(engine), **iso, **evidence, "stage_s": time.perf_counter() - t0, "rank_s": rank_s}
        return isolated, isolated_scores, stage

    def run_recovery(self, engine: Engine, lookup: torch.Tensor) -> tuple[torch.optim.Optimizer, dict[str, float]]:
        """Stage 2a: train on ``D_c`` (or everything) with augmentation to recover CA."""
        t0 = time.perf_counter()
        augment = (
            AugmentConfig(cutout=int(self.recovery_cutout), cutout_span=self.recovery_cutout_span)  # type: ignore[arg-type]
            if self.recovery_augment
            else None
        )
        opt = engine.run_phase(
            "recovery",
            epochs=self.recovery_epochs,  # type: ignore[arg-type]
            lr=self.recovery_lr,  # type: ignore[arg-type]
            milestones=self.recovery_milestones,  # type: ignore[arg-type]
            lr_factor=self.recovery_lr_factor,
            index=(~lookup).nonzero().squeeze(1) if self.recovery_data == "clean" else None,
            augment=augment,
            batch_size=self._batch_size(engine),
            nesterov=self.nesterov,
        )
        return opt, {**phase_metrics(engine), "stage_s": time.perf_counter() - t0}

    def split_holdout(self, isolated: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unlearned, held out): a seeded ``unlearning_holdout`` share of ``isolated`` kept
        out of unlearning. Nothing is held out when either part would be empty."""
        isolated = isolated.sort().values  # the split depends on the set, not its order
        n_hold = int(round(float(self.unlearning_holdout) * len(isolated)))  # type: ignore[arg-type]
        if n_hold < 1 or n_hold >= len(isolated):
            return isolated, isolated[:0]
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(isolated), generator=g).to(isolated.device)
        return isolated[perm[n_hold:]], isolated[perm[:n_hold]]

    def run_unlearning(
        self, engine: Engine, lookup: torch.Tensor, recovery_opt: torch.optim.Optimizer | None = None
    ) -> dict[str, float]:
        """Stage 2b: unlearn the isolated examples (``lookup`` marks them).

        Records ``iso_fit_before`` / ``iso_fit_after``: the model's accuracy on the unlearned
        examples' own training labels, and ``iso_heldout_fit_before`` / ``_after`` on the
        held-out suspects (``unlearning_holdout``). None needs ground truth. The unlearned
        examples can be memorised (their fit reached 0% at full scale while ASR stayed at
        75%), so when suspects are held out they decide ``unlearn_weak`` (fit above 0.5
        after unlearning: the run warns that the link was not cut).
        """
        t0 = time.perf_counter()
        bs = self._batch_size(engine)
        isolated = lookup.nonzero().squeeze(1)
        unlearned, held = self.split_holdout(isolated, engine.seed)
        if self.unlearning_holdout and not len(held):
            warnings.warn(
                f"ABL: {len(isolated)} isolated examples are too few to hold "
                f"{self.unlearning_holdout:.0%} out; unlearning all of them and keeping the last epoch",
                stacklevel=2,
            )
        elif 0 < len(held) < MIN_FIRM_HOLDOUT:
            warnings.warn(
                f"ABL: the held-out check of unlearning rests on {len(held)} suspects only; with so few "
                "it can read 0% fitted while the backdoor still works (measured: 4 suspects, sticker ASR "
                "49%). Raise isolation_rate or unlearning_holdout for a firmer check.",
                stacklevel=2,
            )
        unlearn_lookup = torch.zeros_like(lookup)
        unlearn_lookup[unlearned] = True
        ceiling = self.unlearning_ceiling
        if ceiling is not None and math.isinf(ceiling):
            ceiling = None
        cap = ceiling if ceiling is not None else 10.0

        def held_score() -> tuple[float, float]:
            correct, losses = engine.train_fit(held)
            return float(correct.float().mean()), float(losses.clamp_max(cap).mean())

        # measured on the recovered model, and kept in the engine's state with the best epoch
        # so far: a run resumed mid-unlearning cannot measure them again
        saved = engine.state.setdefault("unlearning", {})
        if "fit_before" not in saved:
            saved["fit_before"] = engine.train_accuracy(unlearned)
            saved["held_before"] = held_score()[0] if len(held) else None
        fit_before, held_before = saved["fit_before"], saved["held_before"]
        select = self.unlearning_select == "heldout" and len(held) > 0
        best: dict = saved.setdefault("best", {"key": None, "epoch": 0, "state": None, "fit": None})

        def watch(e: int) -> bool:
            fit, loss = held_score()
            # the per-epoch curves: held-out suspects, and the unlearned ones for comparison
            engine.history[-1].update(heldout_fit=fit, heldout_loss=loss, unlearned_fit=engine.train_accuracy(unlearned))
            if not select:
                return False
            key = [fit, -loss]
            if best["key"] is None or key < best["key"]:
                best.update(key=key, epoch=e, fit=fit, state={k: v.detach().clone() for k, v in engine.model.state_dict().items()})
            return bool(self.unlearning_patience) and e - best["epoch"] >= int(self.unlearning_patience)  # type: ignore[arg-type]

        clean_index = (~lookup).nonzero().squeeze(1)  # held-out suspects are in neither set
        common = dict(
            epochs=self.unlearning_epochs,
            lr=self.unlearning_lr,
            optimizer=recovery_opt if self.carry_momentum else None,
            batch_size=bs,
            nesterov=self.nesterov,
            freeze_bn={"train": False, "fixed_stats": "stats", "frozen": True}[self.unlearning_bn],  # type: ignore[index]
            after_epoch=watch if len(held) else None,
        )
        n_before = len(engine.history)
        if self.unlearning == "gga":
            over_clean = self.unlearning_epoch == "clean"
            engine.run_phase(
                "unlearning",
                objective=gga_objective(unlearn_lookup, ceiling),
                index=clean_index if over_clean else unlearned,
                paired=unlearned if over_clean else clean_index,
                paired_batch_size=bs,
                **common,  # type: ignore[arg-type]
            )
        else:
            engine.run_phase("unlearning", objective=ascent_objective(ceiling), index=unlearned, **common)  # type: ignore[arg-type]
        epochs_run = len(engine.history) - n_before
        if select and best["state"] is not None and best["epoch"] != epochs_run - 1:
            engine.model.load_state_dict(best["state"])
            final = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        else:
            final = phase_metrics(engine) if "clean_acc" in engine.history[-1] else {
                k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS
            }
        fit_after = engine.train_accuracy(unlearned)
        held_after = held_score()[0] if len(held) else None
        decisive = held_after if held_after is not None else fit_after
        if decisive > 0.5:
            which = "held-out suspects" if held_after is not None else "isolated examples"
            warnings.warn(
                f"ABL: unlearning did not cut the {which}' link to their labels: the model still fits "
                f"{decisive:.0%} of them (before unlearning: {held_before if held_after is not None else fit_before:.0%}); "
                "raise unlearning_epochs or unlearning_lr, or check the isolation evidence.",
                stacklevel=2,
            )
        out = {
            **final, "iso_fit_before": fit_before, "iso_fit_after": fit_after,
            "unlearn_weak": float(decisive > 0.5), "unlearn_epochs_run": float(epochs_run),
            "stage_s": time.perf_counter() - t0,
        }
        if held_after is not None:
            out.update(iso_heldout_fit_before=held_before, iso_heldout_fit_after=held_after, iso_heldout_count=float(len(held)))
        if select:
            out["unlearn_epoch_kept"] = float(best["epoch"] + 1)
        return out


def isolation_evidence(scores: torch.Tensor, isolated: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How far the isolated set stands apart from the rest, without ground truth.

    ``iso_separation``: the distance between the median ranking score of the rest and that
    of the isolated set, in units of the rest's median absolute deviation. For ranking
    scores that are log losses (``trajectory``) or losses, the lowest 1% of one smooth
    distribution sits about 4 spreads below its median; poisons learned far faster than
    everything else sit much further (benchmarks/README.md lists the measured values).
    ``iso_top_label_share``: the share of the isolated set that carries its most common
    label: 1.0 for an all-to-one backdoor, about ``1 / classes`` for a spread of clean tails.
    """
    s = scores.float().cpu()
    if (s > 0).all():  # raw losses (``eval`` ranking): compare them on a log scale too
        s = s.log()
    mask = torch.zeros(len(s), dtype=torch.bool)
    mask[isolated.cpu()] = True
    rest = s[~mask]
    med = rest.median()
    mad = (rest - med).abs().median().clamp_min(1e-6)
    share = torch.bincount(labels[isolated].cpu()).max().item() / max(1, len(isolated))
    return {"iso_separation": float((med - s[mask].median()) / mad), "iso_top_label_share": float(share)}

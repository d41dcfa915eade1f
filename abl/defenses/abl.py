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
from dataclasses import dataclass, fields
from typing import Literal

import torch

from abl.config import check
from abl.data.loader import AugmentConfig
from abl.defenses.base import DEFENSES, Defense, DefenseResult, phase_metrics
from abl.engine import Engine, Objective
from abl.metrics import isolation_metrics

_PAPER: dict[str, object] = dict(
    isolation_loss="lga",
    isolation_epochs=20,
    isolation_lr=0.1,
    isolation_shuffle=True,
    rank_epochs=1,
    recovery_epochs=60,
    recovery_lr=0.1,
    recovery_milestones=[40],
    recovery_data="clean",
    recovery_augment=True,
    unlearning="gga",
    unlearning_epochs=20,
    unlearning_lr=0.0001,
    carry_momentum=False,
)

#: the authors' code, written as its differences from the paper (method.md lists them)
_OFFICIAL_DIFFERS: dict[str, object] = dict(
    isolation_loss="flooding",
    isolation_epochs=10,
    isolation_shuffle=False,
    unlearning="ascent",
    unlearning_epochs=5,
    unlearning_lr=0.0005,
    carry_momentum=True,
)

PRESETS: dict[str, dict[str, object]] = {"paper": _PAPER, "official": {**_PAPER, **_OFFICIAL_DIFFERS}}


def lga_objective(gamma: float) -> Objective:
    """Per-example LGA: ``mean(sign(l - gamma) * l)`` (the paper's Eq. 3)."""

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
        iso = isolated_lookup[idx]
        clean = losses[~iso]
        bad = losses[iso]
        out = clean.mean() if len(clean) else losses.new_zeros(())
        return out - _ascent_term(bad, ceiling) if len(bad) else out

    return objective


def ascent_objective(ceiling: float | None = None) -> Objective:
    """Pure gradient ascent on the isolated examples (the authors' unlearning)."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -_ascent_term(losses, ceiling)

    return objective


ISOLATION_LOSSES = {"lga": lga_objective, "lga_batch": lga_batch_objective, "flooding": flooding_objective}


@DEFENSES.register("abl")
@dataclass
class ABL(Defense):
    """Anti-Backdoor Learning. Fields left ``None`` take the value of ``preset``.

    Parameters:
        preset: ``paper`` or ``official`` (see the module docstring).
        gamma: LGA threshold / flooding level (0.5).
        isolation_rate: fraction ``p`` of the training set isolated as ``D_b`` (0.01).
        isolation_loss: ``lga`` (per example), ``lga_batch`` or ``flooding``.
        isolation_epochs: the turning epoch ``T_te`` (paper 20, official 10).
        isolation_lr: learning rate before the turning epoch (0.1; GTSRB 0.01).
        isolation_shuffle: shuffle during isolation (the authors' loader does not).
        rank_epochs: rank by the eval-mode loss averaged over the last this many isolation
            epochs (both presets: 1, ranking once at the turning epoch as the paper does).
            On small or unconverged runs the model's class bias swings from epoch to
            epoch and drags a clean class's losses below the poisoned ones at a single
            epoch; averaging over 3 epochs removed that in our measurements.
        recovery_epochs, recovery_lr, recovery_milestones, recovery_lr_factor: the middle
            stage (60 epochs at 0.1, x0.1 from its epoch 40; the appendix gives no schedule,
            this is the authors').
        recovery_data: ``clean`` trains on ``D_c`` only (default), ``full`` on every example
            (the appendix's wording; method.md discusses the ambiguity).
        recovery_augment: crop + flip + Cutout in the recovery stage only.
        unlearning: ``gga`` (joint ``mean(D_c) - mean(D_b)``: every batch of ``D_b`` is
            paired with a fresh batch of ``D_c`` of the training batch size) or ``ascent``
            (``-mean(D_b)`` over ``D_b`` only).
        unlearning_epochs, unlearning_lr: paper 20 at 1e-4; official 5 at 5e-4. An
            unlearning epoch is one pass over ``D_b`` (as in the authors' code), so the
            number of ascent steps matches theirs whichever objective is used.
        carry_momentum: keep the recovery optimizer's momentum into unlearning.
        unlearning_ceiling: an isolated example stops being ascended once its loss
            exceeds this (None: unbounded ascent, as in the paper and the authors' code).
    """

    preset: Literal["paper", "official"] = "paper"
    gamma: float = 0.5
    isolation_rate: float = 0.01
    isolation_loss: Literal["lga", "lga_batch", "flooding"] | None = None
    isolation_epochs: int | None = None
    isolation_lr: float | None = None
    isolation_shuffle: bool | None = None
    rank_epochs: int | None = None
    recovery_epochs: int | None = None
    recovery_lr: float | None = None
    recovery_milestones: list[int] | None = None
    recovery_lr_factor: float = 0.1
    recovery_data: Literal["clean", "full"] | None = None
    recovery_augment: bool | None = None
    unlearning: Literal["gga", "ascent"] | None = None
    unlearning_epochs: int | None = None
    unlearning_lr: float | None = None
    carry_momentum: bool | None = None
    unlearning_ceiling: float | None = None

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in PRESETS[self.preset]:
                setattr(self, f.name, copy.copy(PRESETS[self.preset][f.name]))
        check(self.gamma >= 0, "defense.gamma", "must be >= 0")
        check(0 < self.isolation_rate < 1, "defense.isolation_rate", f"must be in (0, 1), got {self.isolation_rate}")
        check(self.isolation_epochs >= 1, "defense.isolation_epochs", "must be >= 1")  # type: ignore[operator]
        check(
            1 <= self.rank_epochs <= self.isolation_epochs,  # type: ignore[operator]
            "defense.rank_epochs",
            f"must be between 1 and isolation_epochs ({self.isolation_epochs})",
        )
        check(self.recovery_epochs >= 0, "defense.recovery_epochs", "must be >= 0")  # type: ignore[operator]
        check(self.unlearning_epochs >= 0, "defense.unlearning_epochs", "must be >= 0")  # type: ignore[operator]
        for name in ("isolation_lr", "recovery_lr", "unlearning_lr"):
            check(getattr(self, name) > 0, f"defense.{name}", "must be > 0")
        check(self.unlearning_ceiling is None or self.unlearning_ceiling > 0, "defense.unlearning_ceiling", "must be > 0")
        check(0 < self.recovery_lr_factor <= 1, "defense.recovery_lr_factor", "must be in (0, 1]")

    def total_epochs(self) -> int:
        return int(self.isolation_epochs) + int(self.recovery_epochs) + int(self.unlearning_epochs)  # type: ignore[arg-type]

    def isolate(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest ``isolation_rate`` fraction of per-example ``losses``: (indices, losses),
        lowest first."""
        k = max(1, int(len(losses) * self.isolation_rate))
        order = torch.argsort(losses, stable=True)[:k]
        return order, losses[order]

    def run(self, engine: Engine) -> DefenseResult:
        n = len(engine.data)
        device = engine.device
        metrics: dict[str, dict[str, float]] = {}

        ranked: list[torch.Tensor] = []
        first_rank = int(self.isolation_epochs) - int(self.rank_epochs)  # type: ignore[arg-type]

        def rank(e: int) -> None:
            if e >= first_rank:
                ranked.append(engine.per_example_loss())

        engine.run_phase(
            "isolation",
            epochs=self.isolation_epochs,  # type: ignore[arg-type]
            lr=self.isolation_lr,  # type: ignore[arg-type]
            objective=ISOLATION_LOSSES[self.isolation_loss](self.gamma),  # type: ignore[index]
            shuffle=bool(self.isolation_shuffle),
            after_epoch=rank,
        )
        isolated, isolated_losses = self.isolate(torch.stack(ranked).mean(0))
        iso = isolation_metrics(isolated, engine.data.poison_mask)
        metrics["isolation"] = {**phase_metrics(engine), **iso}

        lookup = torch.zeros(n, dtype=torch.bool, device=device)
        lookup[isolated] = True
        clean_index = (~lookup).nonzero().squeeze(1)

        opt = None
        if self.recovery_epochs:
            opt = engine.run_phase(
                "recovery",
                epochs=self.recovery_epochs,  # type: ignore[arg-type]
                lr=self.recovery_lr,  # type: ignore[arg-type]
                milestones=self.recovery_milestones,  # type: ignore[arg-type]
                lr_factor=self.recovery_lr_factor,
                index=clean_index if self.recovery_data == "clean" else None,
                augment=AugmentConfig() if self.recovery_augment else None,
            )
            metrics["recovery"] = phase_metrics(engine)

        if self.unlearning_epochs:
            carried = opt if (self.carry_momentum and opt is not None) else None
            if self.unlearning == "gga":
                engine.run_phase(
                    "unlearning",
                    epochs=self.unlearning_epochs,  # type: ignore[arg-type]
                    lr=self.unlearning_lr,  # type: ignore[arg-type]
                    optimizer=carried,
                    objective=gga_objective(lookup, self.unlearning_ceiling),
                    index=isolated,
                    paired=clean_index,
                    paired_batch_size=engine.cfg.batch_size,
                )
            else:
                engine.run_phase(
                    "unlearning",
                    epochs=self.unlearning_epochs,  # type: ignore[arg-type]
                    lr=self.unlearning_lr,  # type: ignore[arg-type]
                    optimizer=carried,
                    objective=ascent_objective(self.unlearning_ceiling),
                    index=isolated,
                )
            metrics["unlearning"] = phase_metrics(engine)

        metrics["final"] = {**phase_metrics(engine), **iso}
        return DefenseResult(metrics=metrics, isolated=isolated.cpu(), isolated_losses=isolated_losses.cpu())

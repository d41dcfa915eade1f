"""Training detectors: train on the poisoned set with an isolation loss, then rank every
example by how well the model fits it (Li et al., "Anti-Backdoor Learning", NeurIPS 2021).

Backdoor examples are learned far faster than clean ones; a loss that keeps the model from
fitting everything (LGA's threshold, flooding's level, label smoothing) widens that gap,
and the examples with the lowest loss at the turning epoch are isolated. Each member here
is one loss of the paper's comparisons:

- ``lga``: LGA per example (the paper's Eq. 3 read per example).
- ``lga_batch``: LGA on the batch mean (the authors' code; ``paper`` preset).
- ``abl_default``: ``lga_batch`` ranked by the loss trajectory (the ``default`` preset).
- ``flooding``: flooding at level 0.5 (Ishida et al., ICML 2020; appendix B.6, Figure 8).
- ``cross_entropy``: plain training, gamma = 0 (Table 7's baseline column).
- ``label_smoothing``: label smoothing 0.2 or 0.4 (appendix B.6, Figure 9).

Scores are negated ranking scores (higher = more suspicious), so they compare with the
model-based detectors' scores: ``-loss`` for an ``eval`` ranking, ``-mean log loss`` for
``trajectory``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from abl.config import check
from abl.data.types import PoisonedSet
from abl.detectors.base import DETECTORS, Detector
from abl.engine import Engine, Objective, mean_loss


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


@dataclass
class TrainedIsolation(Detector):
    """Train with an isolation loss from the current model, then rank (the ABL paper's
    first stage).

    Parameters:
        epochs: the turning epoch ``T_te`` (20 in the paper).
        lr: learning rate of the isolation training (0.1; GTSRB 0.01).
        shuffle: shuffle the training order.
        ranking: ``eval`` ranks by the eval-mode, un-augmented loss after each of the last
            ``rank_epochs`` epochs (averaged; the paper ranks once at the turning epoch);
            ``trajectory`` by the mean log training loss of each example over the last
            ``rank_epochs`` epochs, read from the loss record of the training batches (no
            extra pass): it scores how early and how far an example was fitted.
        rank_epochs: epochs the ranking uses, the last ones (0: the last half, rounded up).
        batch_size: training batch size (None: ``train.batch_size``).
        nesterov: Nesterov momentum (None: ``train.nesterov``).
    """

    uses_backdoored: ClassVar[bool] = False

    epochs: int = 20
    lr: float = 0.1
    shuffle: bool = True
    ranking: Literal["eval", "trajectory"] = "eval"
    rank_epochs: int = 1
    batch_size: int | None = None
    nesterov: bool | None = None

    def validate(self) -> None:
        check(self.epochs >= 1, "detector.epochs", "must be >= 1")
        check(self.lr > 0, "detector.lr", "must be > 0")
        check(
            0 <= self.rank_epochs <= self.epochs,
            "detector.rank_epochs",
            f"must be between 0 (the last half) and epochs ({self.epochs})",
        )
        check(self.batch_size is None or self.batch_size >= 1, "detector.batch_size", "must be >= 1 or null")

    def objective(self) -> Objective:
        return mean_loss

    def smoothing(self) -> float:
        return 0.0

    def training_epochs(self) -> int:
        return self.epochs

    def rank_count(self) -> int:
        """How many of the last epochs the ranking uses."""
        return self.rank_epochs or -(-self.epochs // 2)

    def score(self, model: torch.nn.Module, data: PoisonedSet, *, batch_size: int = 1024) -> torch.Tensor:
        raise TypeError(f"detector '{self.registered_name}' trains its own model: call detect(engine)")  # type: ignore[attr-defined]

    def detect(self, engine: Engine, backdoor: object = None) -> torch.Tensor:
        """Train phase ``isolation`` on ``engine`` and return the scores (on the CPU)."""
        # in the engine's state: a resumed run needs the ranking passes made before the stop
        evals: list[torch.Tensor] = engine.state.setdefault("isolation_evals", [])
        first_rank = self.epochs - self.rank_count()

        def rank(e: int) -> None:
            if self.ranking == "eval" and e >= first_rank:
                evals.append(engine.per_example_loss())

        engine.run_phase(
            "isolation",
            epochs=self.epochs,
            lr=self.lr,
            objective=self.objective(),
            shuffle=self.shuffle,
            after_epoch=rank,
            batch_size=self.batch_size,
            nesterov=self.nesterov,
            smoothing=self.smoothing(),
        )
        t0 = time.perf_counter()
        scores = -self.ranking_scores(engine, evals).float().cpu()
        self.rank_seconds = time.perf_counter() - t0  # the ranking alone (ABL's ``rank_s``)
        return scores

    def ranking_scores(self, engine: Engine, evals: list[torch.Tensor]) -> torch.Tensor:
        """Per-example ranking scores, lowest = most suspicious (see ``ranking``)."""
        if self.ranking == "eval":
            return torch.stack(evals).mean(0)
        record = torch.stack(engine.example_losses[-self.rank_count():])
        # log: an example fitted to 1e-4 is far more suspicious than one at 1e-2, which a
        # mean of raw losses (dominated by the early, high values) would hide
        return record.clamp_min(1e-12).log().mean(0)


@dataclass
class _Thresholded(TrainedIsolation):
    """A training detector with a loss threshold.

    Parameters:
        gamma: the loss threshold (LGA) or flooding level (0.5 in the paper).
    """

    gamma: float = 0.5

    def validate(self) -> None:
        super().validate()
        check(self.gamma >= 0, "detector.gamma", "must be >= 0")


@DETECTORS.register("lga")
@dataclass
class LGA(_Thresholded):
    """ABL's local gradient ascent per example (:func:`lga_objective`; 0.0% precision on
    full CIFAR-10 BadNets, so never a preset's choice)."""

    def objective(self) -> Objective:
        return lga_objective(self.gamma)


@DETECTORS.register("lga_batch")
@dataclass
class LGABatch(_Thresholded):
    """ABL's local gradient ascent on the batch mean (the authors' code and the ``paper``
    preset; 490 of 500 BadNets poisons isolated on full CIFAR-10)."""

    def objective(self) -> Objective:
        return lga_batch_objective(self.gamma)


@DETECTORS.register("abl_default")
@dataclass
class ABLDefault(LGABatch):
    """The isolation of ABL's ``default`` preset: batch-mean LGA ranked by the mean log
    training loss over the last half of the epochs (benchmarks/README.md, "Choosing the
    default": 100% precision on the 5,000-image CIFAR-10 BadNets slice)."""

    ranking: Literal["eval", "trajectory"] = "trajectory"
    rank_epochs: int = 0


@DETECTORS.register("flooding")
@dataclass
class Flooding(_Thresholded):
    """Flooding on the batch mean, level ``gamma`` (Ishida et al., ICML 2020; the ABL
    authors' default isolation loss, and the paper's appendix B.6 at level 0.5)."""

    def objective(self) -> Objective:
        return flooding_objective(self.gamma)


@DETECTORS.register("cross_entropy")
@dataclass
class CrossEntropy(TrainedIsolation):
    """Plain cross-entropy training, then the same ranking: LGA with gamma = 0, Table 7's
    baseline column (26% precision on CIFAR-10 in the paper)."""


@DETECTORS.register("label_smoothing")
@dataclass
class LabelSmoothing(TrainedIsolation):
    """Train with label smoothing and isolate the examples the model is most confident
    of (lowest plain cross-entropy) (Szegedy et al., CVPR 2016; the ABL paper's appendix
    B.6, Figure 9, at 0.2 and 0.4).

    Parameters:
        smoothing_value: the label-smoothing value (0.2).
    """

    smoothing_value: float = 0.2

    def validate(self) -> None:
        super().validate()
        check(0 < self.smoothing_value < 1, "detector.smoothing_value", "must be in (0, 1)")

    def smoothing(self) -> float:
        return self.smoothing_value


#: ABL's ``isolation_loss`` values -> the detector that implements each
ISOLATION_DETECTORS: dict[str, type[TrainedIsolation]] = {"lga": LGA, "lga_batch": LGABatch, "flooding": Flooding}

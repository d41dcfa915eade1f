"""No defense: the backdoored baseline, trained as the ABL paper trains it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abl.config import check
from abl.data.loader import AugmentConfig
from abl.defenses.base import DEFENSES, Defense, DefenseResult, phase_metrics
from abl.engine import Engine


@DEFENSES.register("none")
@dataclass
class NoDefense(Defense):
    """Plain training on the poisoned set (the paper's backdoored models, appendix A.2).

    Parameters (paper defaults for CIFAR-10; GTSRB uses lr 0.01):
        epochs: 100.
        lr: the starting learning rate (0.1).
        milestones: epochs at which the learning rate is multiplied by ``lr_factor``
            ([20, 70]).
        lr_factor: what the learning rate is multiplied by at each milestone (0.1).
        augment: False: the paper trains its backdoored models without augmentation.
    """

    epochs: int = 100
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [20, 70])
    lr_factor: float = 0.1
    augment: bool = False

    def validate(self) -> None:
        check(self.epochs >= 1, "defense.epochs", "must be >= 1")
        check(self.lr > 0, "defense.lr", "must be > 0")
        check(0 < self.lr_factor <= 1, "defense.lr_factor", "must be in (0, 1]")

    def total_epochs(self) -> int:
        return self.epochs

    def run(self, engine: Engine) -> DefenseResult:
        self.train_on(engine)
        return DefenseResult(metrics={"final": phase_metrics(engine)})

    def train_on(self, engine: Engine, index: torch.Tensor | None = None) -> None:
        """This schedule's one phase, on the examples at ``index`` (all when None)."""
        engine.run_phase(
            "train",
            epochs=self.epochs,
            lr=self.lr,
            milestones=self.milestones,
            lr_factor=self.lr_factor,
            index=index,
            augment=AugmentConfig() if self.augment else None,
        )

"""Clean training: the oracle of the threat matrix, the same data without its poisons."""

from __future__ import annotations

from dataclasses import dataclass

from abl.defenses.base import DEFENSES, DefenseResult, phase_metrics
from abl.defenses.none import NoDefense
from abl.engine import Engine


@DEFENSES.register("clean")
@dataclass
class CleanTraining(NoDefense):
    """Training with the ``none`` defense's schedule on the training set minus the poisoned
    examples, found by the ground truth (the run's poison mask): what ABL (Li et al.,
    NeurIPS 2021) would reach if its isolation found every poison and nothing else.

    Only the examples an attack poisons are removed. The examples an attack adds to make its
    trigger specific without poisoning them (WaNet's noise-mode cross examples, BPP's
    negatives) keep their true labels and stay, as they would in a defender's data. Without
    an attack nothing is removed and it trains as ``none``.

    Parameters (those of ``none``, the paper's no-defense schedule, appendix A.2):
        epochs: training epochs (100).
        lr: the starting learning rate (0.1).
        milestones: epochs at which the learning rate is multiplied by ``lr_factor``
            ([20, 70]).
        lr_factor: what the learning rate is multiplied by at each milestone (0.1).
        augment: False, as the paper's backdoored models.
    """

    def run(self, engine: Engine) -> DefenseResult:
        keep = (~engine.data.poison_mask).nonzero().squeeze(1)
        self.train_on(engine, index=keep)
        # the count under its own phase: "final" holds rates only, as every defense's
        return DefenseResult(metrics={"clean": {"removed": float(len(engine.data) - len(keep))},
                                      "final": phase_metrics(engine)})

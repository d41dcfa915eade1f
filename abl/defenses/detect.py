"""Isolation by a detector on the backdoored model: the ABL paper's Figure 7 comparison.

Trains (or reads from the stage cache, ``abl.stages``) the model without defense, scores
every training example with a registered detector (activation clustering, spectral
signatures, ...), and isolates the most suspicious ``rate``. The model is left as trained:
this defense measures how well a detector finds the poisons, with precision and recall at
``rate`` and the area under the precision-recall curve of all scores (Li et al., NeurIPS
2021, appendix B.3: AC and SS against ABL's isolation at 1%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from abl.config import check, to_plain
from abl.defenses.base import DEFENSES, Defense, DefenseResult, phase_metrics
from abl.detectors import DETECTORS, detection_metrics, isolate
from abl.engine import Engine
from abl.stages import BackdoorSchedule, backdoored_model


@DEFENSES.register("detect")
@dataclass
class Detect(Defense):
    """Score with ``detector`` on the backdoored model and isolate the top ``rate``.

    Parameters:
        detector: a detector and its parameters (``{name: spectral_signatures}``; see
            ``abl list detector``); recorded with every parameter resolved.
        rate: fraction of the training set isolated (the paper compares at 1%).
        backdoor: the schedule of the backdoored model (the paper's no-defense training:
            100 epochs, lr 0.1 divided by 10 at 20 and 70); cached and shared by every run
            with the same data, model, seed and schedule.
    """

    detector: dict[str, Any] = field(default_factory=lambda: {"name": "spectral_signatures"})
    rate: float = 0.01
    backdoor: BackdoorSchedule = field(default_factory=BackdoorSchedule)

    def validate(self) -> None:
        check(0 < self.rate < 1, "defense.rate", f"must be in (0, 1), got {self.rate}")
        self._detector = DETECTORS.create(self.detector, "defense.detector")
        self.detector = to_plain(self._detector)  # the resolved parameters are what is recorded

    def total_epochs(self) -> int:
        return self.backdoor.epochs

    def run(self, engine: Engine) -> DefenseResult:
        stage = backdoored_model(engine, self.backdoor)
        if stage["hit"]:
            model_metrics = {k: float(v) for k, v in engine.evaluate(full=True).items()}
        else:
            model_metrics = phase_metrics(engine)
        scores = self._detector.score(engine.model, engine.data, batch_size=engine.cfg.eval_batch_size)
        iso = isolate(scores, self.rate)
        found = detection_metrics(scores, engine.data.poison_mask.cpu(), self.rate)
        if not bool(engine.data.poison_mask.any()):  # no ground truth (attack: null)
            found = {k: (math.nan if k in ("precision", "recall", "auprc") else v) for k, v in found.items()}
        iso_keys = {
            "iso_precision": found["precision"], "iso_recall": found["recall"], "iso_auprc": found["auprc"],
            "iso_count": found["count"],
        }
        stage_metrics = {"stage_hit": float(stage["hit"])}
        return DefenseResult(
            metrics={"backdoored": {**model_metrics, **stage_metrics}, "final": {**model_metrics, **iso_keys}},
            isolated=iso.cpu(),
            # negated: as for ABL's losses, lower = more suspicious, most suspicious first
            isolated_losses=-scores[iso.cpu()].float(),
            notes={"stage_backdoored": stage["key"]},
        )

"""Isolation by any detector: the ABL paper's Figure 7 comparison (and Table 7, Figures 8-9).

A model-based detector (activation clustering, spectral signatures) scores with the model
trained without defense (read from the stage cache, ``abl.stages``, when another run
trained it already); a training detector (LGA, flooding, cross-entropy, label smoothing)
trains its own isolation model. Every training example gets a score and the most
suspicious ``rate`` are isolated. The model is left as trained:
this defense measures how well a detector finds the poisons, with precision and recall at
``rate`` and the area under the precision-recall curve of all scores (Li et al., NeurIPS
2021, appendix B.3: AC and SS against ABL's isolation at 1%).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from abl.config import check, to_plain
from abl.defenses.base import DEFENSES, METRIC_KEYS, Defense, DefenseResult, phase_metrics
from abl.detectors import DETECTORS, detection_metrics, isolate
from abl.engine import Engine
from abl.stages import BackdoorSchedule


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
        det = self._detector
        return det.training_epochs() + (self.backdoor.epochs if det.uses_backdoored else 0)

    def run(self, engine: Engine) -> DefenseResult:
        det = self._detector
        t0 = time.perf_counter()
        scores = det.detect(engine, self.backdoor)
        detect_s = time.perf_counter() - t0
        if engine.history:
            model_metrics = phase_metrics(engine)
        else:  # the backdoored model came from the stage cache: nothing trained in this run
            model_metrics = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        iso = isolate(scores, self.rate)
        found = detection_metrics(scores, engine.data.poison_mask.cpu(), self.rate)
        if not bool(engine.data.poison_mask.any()):  # no ground truth (attack: null)
            found = {k: (math.nan if k in ("precision", "recall", "auprc") else v) for k, v in found.items()}
        iso_keys = {
            "iso_precision": found["precision"], "iso_recall": found["recall"], "iso_auprc": found["auprc"],
            "iso_count": found["count"],
        }
        notes: dict[str, object] = {"detector": self.detector}
        stage_name = "isolation"
        stage_metrics: dict[str, float] = {"stage_s": detect_s}
        if det.uses_backdoored:
            info = engine.state["stages"]["backdoored"]
            stage_name = "backdoored"
            stage_metrics["stage_hit"] = float(info["hit"])
            notes["stage_backdoored"] = info["key"]
        return DefenseResult(
            metrics={stage_name: {**model_metrics, **stage_metrics}, "final": {**model_metrics, **iso_keys}},
            isolated=iso.cpu(),
            # negated: as for ABL's losses, lower = more suspicious, most suspicious first
            isolated_losses=-scores[iso.cpu()].float(),
            notes=notes,
        )

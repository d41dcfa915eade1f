"""Post-training defenses: purify a backdoored model with a little clean data.

The ABL paper compares against defenses that start from the model trained on the poisoned
set and a small set of examples the defender knows to be clean (appendix A.3: 5% of the
training data). The backdoored model is the shared stage of :mod:`abl.stages` (trained once
per data, model, seed and schedule, then cached). The clean subset is drawn here, by the
framework, from the unpoisoned examples with a fixed seed and recorded with the run; the
defense itself sees only those indices and the model, never the poison mask
(:meth:`PostTraining.purify`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from abl.config import check
from abl.data.types import PoisonedSet
from abl.defenses.base import Defense, DefenseResult
from abl.engine import Engine
from abl.metrics import METRIC_KEYS
from abl.stages import BackdoorSchedule, backdoored_model


def defender_clean_subset(data: PoisonedSet, fraction: float, seed: int) -> torch.Tensor:
    """A seeded ``fraction`` of the training set drawn from its unpoisoned examples (sorted
    indices on the data's device): the clean data the defender is given."""
    clean = (~data.poison_mask).nonzero().squeeze(1).cpu()
    k = max(1, int(round(fraction * len(data))))
    if k > len(clean):
        raise ValueError(f"a clean subset of {k} examples needs as many unpoisoned ones; the set has {len(clean)}")
    g = torch.Generator().manual_seed(seed)
    pick = clean[torch.randperm(len(clean), generator=g)[:k]]
    return pick.sort().values.to(data.images.device)


@dataclass
class PostTraining(Defense):
    """Template: put the backdoored model in the engine, draw the defender's clean subset,
    then :meth:`purify`.

    Parameters:
        clean_fraction: share of the training set given to the defender as known-clean
            data (0.05, the appendix's 5%), drawn from unpoisoned examples with
            ``clean_seed``.
        clean_seed: seed of that draw (recorded; the same subset for every defense).
        backdoor: the schedule of the backdoored model (the paper's no-defense training),
            cached and shared with every run on the same data, model and seed.
    """

    clean_fraction: float = 0.05
    clean_seed: int = 0
    backdoor: BackdoorSchedule = field(default_factory=BackdoorSchedule)

    def validate(self) -> None:
        check(0 < self.clean_fraction < 1, "defense.clean_fraction", f"must be in (0, 1), got {self.clean_fraction}")
        self.backdoor.validate()

    def total_epochs(self) -> int:
        return self.backdoor.epochs + self.purify_epochs()

    def purify_epochs(self) -> int:
        raise NotImplementedError

    def run(self, engine: Engine) -> DefenseResult:
        stage = backdoored_model(engine, self.backdoor)
        if engine.history and engine.history[-1].get("phase") == "backdoor":
            start = {k: float(engine.history[-1][k]) for k in METRIC_KEYS if k in engine.history[-1]}
        else:  # from the stage cache
            start = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        clean = defender_clean_subset(engine.data, self.clean_fraction, self.clean_seed)
        self.notes: dict[str, object] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        metrics = self.purify(engine, clean)
        last = list(metrics.values())[-1]
        last["purify_s"] = time.perf_counter() - t0
        metrics["final"] = {k: v for k, v in last.items() if k in METRIC_KEYS}
        return DefenseResult(
            metrics={"backdoored": {**start, "stage_hit": float(stage["hit"])}, **metrics},
            notes={"stage_backdoored": stage["key"], "clean_subset": clean.cpu().tolist(), **self.notes},
            tensors=self.tensors,
        )

    def purify(self, engine: Engine, clean: torch.Tensor) -> dict[str, dict[str, float]]:
        """Purify ``engine.model`` with the clean examples ``clean`` only; return metrics
        per step (the last one's CA/ASR become the run's final figures). What else the run
        should record goes into ``self.notes`` (saved as ``notes.json``) and
        ``self.tensors`` (``defense_artefacts.safetensors``)."""
        raise NotImplementedError

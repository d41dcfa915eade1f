"""The defense template: a defense is a composition of engine phases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from abl.engine import Engine
from abl.registry import Registry

DEFENSES: Registry = Registry("defense")

METRIC_KEYS = ("clean_acc", "clean_acc_nontarget", "asr", "robust_acc")


@dataclass
class DefenseResult:
    """What a defense hands back: metrics after each phase (``final`` last) and, for
    defenses that isolate examples, the isolated training indices with their losses."""

    metrics: dict[str, dict[str, float]]
    isolated: torch.Tensor | None = None
    isolated_losses: torch.Tensor | None = None
    #: what the run should record beside its metrics (saved as the run's ``notes.json``)
    notes: dict[str, Any] = field(default_factory=dict)


class Defense:
    """Base of every defense: ``run(engine)`` trains ``engine.model`` and returns metrics."""

    def run(self, engine: Engine) -> DefenseResult:
        raise NotImplementedError

    def total_epochs(self) -> int:
        raise NotImplementedError


def phase_metrics(engine: Engine) -> dict[str, float]:
    """The full evaluation recorded at the last epoch of the phase just run."""
    last = engine.history[-1]
    return {k: float(last[k]) for k in METRIC_KEYS if k in last}

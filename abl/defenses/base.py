"""The defense template: a defense is a composition of engine phases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from abl.engine import Engine
from abl.registry import Registry

DEFENSES: Registry = Registry("defense")

from abl.metrics import METRIC_KEYS, phase_metrics  # noqa: E402,F401  (re-exported)


@dataclass
class DefenseResult:
    """What a defense hands back: metrics after each phase (``final`` last) and, for
    defenses that isolate examples, the isolated training indices with their losses."""

    metrics: dict[str, dict[str, float]]
    isolated: torch.Tensor | None = None
    isolated_losses: torch.Tensor | None = None
    #: what the run should record beside its metrics (saved as the run's ``notes.json``)
    notes: dict[str, Any] = field(default_factory=dict)
    #: tensors the run should keep (saved together as ``defense_artefacts.safetensors``)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Defense:
    """Base of every defense: ``run(engine)`` trains ``engine.model`` and returns metrics."""

    def run(self, engine: Engine) -> DefenseResult:
        raise NotImplementedError

    def total_epochs(self) -> int:
        raise NotImplementedError

"""Every component registry, with all built-in components registered."""

from __future__ import annotations

from abl.attacks import ATTACKS
from abl.data.datasets import DATASETS
from abl.defenses import DEFENSES
from abl.detectors import DETECTORS
from abl.models import MODELS
from abl.registry import Registry
from abl.unlearning import UNLEARNERS


def all_registries() -> dict[str, Registry]:
    return {"dataset": DATASETS, "model": MODELS, "attack": ATTACKS, "defense": DEFENSES, "detector": DETECTORS,
            "unlearner": UNLEARNERS}

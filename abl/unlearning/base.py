"""The unlearner template: given the isolated ``D_b`` and the rest ``D_c``, produce the
final model (the second half of ABL; the ABL paper's Table 8 compares eleven ways).

An unlearner starts from ``engine.model`` as the isolation (and recovery) left it, trains
it through the engine, and returns the stage's metrics. It never changes
``engine.data``: methods that relabel or perturb ``D_b`` train on a modified copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from abl.engine import Engine
from abl.registry import Registry

UNLEARNERS: Registry = Registry("unlearner")


@dataclass
class UnlearnContext:
    """What the defense hands an unlearner.

    ``isolated``: indices of ``D_b`` on the engine's device. ``recovery_opt``: the
    optimizer of the stage before (to carry momentum over), if any. ``batch_size`` and
    ``nesterov``: the defense's settings (None: the engine's). ``clean``: indices of
    ``D_c`` (None: every example not in ``D_b``; a post-training defense passes its clean
    subset). ``images`` / ``labels``: the training set to use in place of the engine's
    (same length and order; e.g. ``D_b`` stamped with a reverse-engineered trigger).
    """

    isolated: torch.Tensor
    recovery_opt: torch.optim.Optimizer | None = None
    batch_size: int | None = None
    nesterov: bool | None = None
    clean: torch.Tensor | None = None
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def clean_index(self, n: int, device: torch.device) -> torch.Tensor:
        """Indices of ``D_c``."""
        if self.clean is not None:
            return self.clean
        return (~self.lookup(n, device)).nonzero().squeeze(1)

    def images_of(self, engine: Engine) -> torch.Tensor:
        return engine.data.images if self.images is None else self.images

    def labels_of(self, engine: Engine) -> torch.Tensor:
        return engine.data.labels if self.labels is None else self.labels

    def lookup(self, n: int, device: torch.device) -> torch.Tensor:
        """Boolean ``(n,)`` mask of ``D_b``."""
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[self.isolated] = True
        return mask


class Unlearner:
    """Base of every unlearner: ``unlearn(engine, ctx)`` -> the stage's metrics.

    Subclasses are dataclasses whose fields are their parameters, registered with
    ``@UNLEARNERS.register(name)``. ``method_type`` and ``discards_isolated`` are the
    columns of the paper's Table 8.
    """

    method_type: ClassVar[str] = "model-based"
    discards_isolated: ClassVar[bool] = False

    def total_epochs(self) -> int:
        raise NotImplementedError

    def unlearn(self, engine: Engine, ctx: UnlearnContext) -> dict[str, float]:
        raise NotImplementedError


def fresh_model(engine: Engine, seed: int) -> None:
    """Give ``engine.model`` freshly initialised weights (seeded): rebuilt by
    ``engine.model_factory`` when the experiment set one (the model's own initialisation),
    else each layer's ``reset_parameters``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        factory: Callable[[], torch.nn.Module] | None = getattr(engine, "model_factory", None)
        if factory is not None:
            engine.model.load_state_dict(factory().state_dict())
        else:
            for m in engine.model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()  # type: ignore[operator]
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
    finally:
        torch.random.set_rng_state(state)

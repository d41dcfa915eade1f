"""The detector template: score every training example for suspicion.

Two kinds. A *model-based* detector (activation clustering, spectral signatures) looks at
the poisoned training set through a model trained on it without defense (the backdoored
model, a cached stage: :func:`abl.stages.backdoored_model`). A *training* detector (ABL's
LGA, flooding, plain cross-entropy, label smoothing: :mod:`abl.detectors.loss`) trains
its own model on the poisoned set with its loss and ranks the examples by how well they
are fitted. Either way every example gets a score, higher = more suspicious, and the
isolated set is the top fraction of the scores (:func:`isolate`). Scores are only
compared with each other, so a detector may use any scale, but they must be finite and
comparable across classes, because the isolated set is taken over the whole training set.
"""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING, ClassVar

from abl.data.loader import to_float
from abl.data.types import PoisonedSet
from abl.registry import Registry

if TYPE_CHECKING:
    from abl.engine import Engine
    from abl.stages import BackdoorSchedule

DETECTORS: Registry = Registry("detector")


class Detector:
    """Base of every detector: ``score(model, data)`` -> one float per training example.

    Subclasses are dataclasses whose fields are their parameters (validated in
    ``validate()``), registered with ``@DETECTORS.register(name)``.
    """

    #: True: :meth:`detect` scores with the cached backdoored model; False: it trains
    uses_backdoored: ClassVar[bool] = True

    def score(self, model: torch.nn.Module, data: PoisonedSet, *, batch_size: int = 1024) -> torch.Tensor:
        """Suspicion scores, float ``(N,)`` on the CPU, finite, higher = more suspicious."""
        raise NotImplementedError

    def training_epochs(self) -> int:
        """Epochs :meth:`detect` trains (a model-based detector: none of its own)."""
        return 0

    def detect(self, engine: Engine, backdoor: BackdoorSchedule | None = None) -> torch.Tensor:
        """Scores for ``engine.data``; ``engine.model`` is left as the model that scored them.

        A model-based detector first puts the backdoored model into the engine (trained
        with ``backdoor``, or read from the stage cache); call it on the freshly
        initialised model, whose weights are part of the cache key.
        """
        from abl.stages import BackdoorSchedule, backdoored_model

        backdoored_model(engine, backdoor or BackdoorSchedule())
        return self.score(engine.model, engine.data, batch_size=engine.cfg.eval_batch_size)


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """``model.features`` (the last hidden layer) of uint8 ``images``, float64 ``(N, D)`` on the CPU.

    Eval mode (BatchNorm running statistics: an example's features must not depend on
    its batch) and no augmentation; the model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(images), batch_size):
            x = to_float(images[s : s + batch_size].to(device))
            out.append(model.features(x).float().cpu())
    finally:
        model.train(was_training)
    # float64: SVD, ICA and distances on features of thousands of examples stay exact enough
    return torch.cat(out).double() if out else torch.empty(0, 0, dtype=torch.float64)


def score_per_class(
    model: torch.nn.Module, data: PoisonedSet, class_scores, *, batch_size: int = 1024
) -> torch.Tensor:
    """Features of every training example, scored class by class (by training label) with
    ``class_scores(features of one class) -> scores``; float32 ``(N,)`` on the CPU."""
    feats = extract_features(model, data.images, batch_size=batch_size)
    labels = data.labels.cpu()
    scores = torch.zeros(len(labels), dtype=torch.float64)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        scores[idx] = torch.as_tensor(class_scores(feats[idx]), dtype=torch.float64)
    return scores.float()


def isolate(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Indices of the ``max(1, int(N * rate))`` highest scores, most suspicious first.

    Ties keep index order (a stable sort), so the isolated set is deterministic.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    k = max(1, int(len(scores) * rate))
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    return order[:k]

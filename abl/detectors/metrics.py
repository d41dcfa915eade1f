"""How well a detector's scores find the poisoned examples.

Precision and recall of the isolated top fraction (:func:`abl.metrics.isolation_metrics`
on :func:`~abl.detectors.base.isolate`), and the area under the precision-recall curve
of the scores as a whole (average precision), which does not depend on a chosen fraction:
a random ranking scores the poison rate, a perfect one 1.
"""

from __future__ import annotations

import torch
from sklearn.metrics import average_precision_score

from abl.detectors.base import isolate
from abl.metrics import isolation_metrics


def detection_metrics(scores: torch.Tensor, poison_mask: torch.Tensor, rate: float) -> dict[str, float]:
    """``precision`` and ``recall`` of the top ``rate`` of ``scores``, ``auprc`` (average
    precision of the whole ranking), ``base_rate`` (the poison fraction: what a random
    ranking's precision and AUPRC come to) and ``count`` (examples isolated).

    Without poisoned examples (clean data) precision, recall and AUPRC are NaN.
    """
    mask = poison_mask.cpu().bool()
    if scores.shape != mask.shape:
        raise ValueError(f"{tuple(scores.shape)} scores for a poison mask of shape {tuple(mask.shape)}")
    iso = isolation_metrics(isolate(scores, rate), mask)
    n_poison = int(mask.sum())
    auprc = float("nan")
    if n_poison > 0:
        # average precision is the step-wise PR-curve area (no optimistic interpolation)
        auprc = float(average_precision_score(mask.numpy(), scores.detach().cpu().double().numpy()))
    return {
        "precision": iso["iso_precision"],
        "recall": iso["iso_recall"],
        "auprc": auprc,
        "base_rate": n_poison / len(mask) if len(mask) else float("nan"),
        "count": iso["iso_count"],
    }


__all__ = ["detection_metrics"]

"""Spectral signatures (Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks",
NeurIPS 2018, https://arxiv.org/abs/1811.00636)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from abl.config import check
from abl.data.types import PoisonedSet
from abl.detectors.base import DETECTORS, Detector, score_per_class

_TINY = 1e-12  # below this a class's median score means its features do not vary


@DETECTORS.register("spectral_signatures")
@dataclass
class SpectralSignatures(Detector):
    """Spectral signatures: outliers along the top singular direction of each class.

    Per class (by the training label): centre the last-hidden-layer representations, take
    the top right singular vector(s) of the centred matrix, and score each example by its
    squared projection on them (the paper's outlier score). Poisons relabelled into a class
    form a sub-population whose mean differs from the clean one; that difference dominates
    the class's covariance, so they sit far out along its top direction.

    Across classes (the paper ranks within each class only) the raw squared projections
    are compared as they are (``normalise: none``, the default): every class's
    representations live in the same feature space, in the same units, and a poisoned
    class, being a mixture of two populations, has a larger spread along its top direction
    than a clean one; that excess is the signature. Dividing by a per-class scale removes
    it: on digits (BadNets 5%, small CNN; ``tests/test_detectors.py``) dividing by the
    class's median score dropped the AUPRC from 0.52 to 0.13, and dividing by its median
    squared distance to the mean, or by its second singular value, also fell below the
    raw score at every setting we measured. ``normalise: median`` is kept for feature
    spaces whose classes differ in scale for benign reasons (a normalised score reads
    "times this class's typical squared deviation"); ranking within class was rejected
    outright: it gives every class the same share of the isolated set, while an all-to-one
    attack puts every poison in one class. A class of one example scores 0.

    Threat model: dirty-label poisoning whose poisons share a trigger feature the model
    learned; the detector needs white-box access to the model's features.

    Parameters:
        components: how many top singular directions to project on (1 in the paper); the
            score is the sum of the squared projections.
        normalise: ``none`` (raw squared projections, compared across classes) or
            ``median`` (each divided by its class's median score).

    Input: a :class:`PoisonedSet` (uint8 images) and a model with ``features(x)``. Example::

        DETECTORS.create({"name": "spectral_signatures"}).score(model, data)
    """

    components: int = 1
    normalise: Literal["none", "median"] = "none"

    def validate(self) -> None:
        check(self.components >= 1, "detector.components", f"must be >= 1, got {self.components}")

    def score(self, model: torch.nn.Module, data: PoisonedSet, *, batch_size: int = 1024) -> torch.Tensor:
        return score_per_class(model, data, self.class_scores, batch_size=batch_size)

    def class_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Scores of the examples of one class, from their features ``(n, D)``."""
        n = feats.shape[0]
        if n < 2:
            return torch.zeros(n, dtype=torch.float64)
        centred = feats - feats.mean(0, keepdim=True)
        # rows of vh are the right singular vectors, by decreasing singular value
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        k = min(self.components, vh.shape[0])
        raw = (centred @ vh[:k].T).pow(2).sum(1)
        if self.normalise == "none":
            return raw
        median = float(raw.median())
        if median <= _TINY:
            # more than half the class sits at its mean along the direction: fall back to
            # the mean, and to 0 when nothing varies at all
            mean = float(raw.mean())
            return raw / mean if mean > _TINY else torch.zeros(n, dtype=torch.float64)
        return raw / median

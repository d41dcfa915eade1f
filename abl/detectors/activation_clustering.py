"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", SafeAI@AAAI 2019, https://arxiv.org/abs/1811.03728)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from abl.config import check
from abl.data.types import PoisonedSet
from abl.detectors.base import DETECTORS, Detector, score_per_class

#: the within-cluster tie-break spans this fraction of the gap between the scores of a
#: class's two clusters: below 1, so it never reorders them, and small, so it barely
#: moves a class against the others
TIE = 1e-3


@DETECTORS.register("activation_clustering")
@dataclass
class ActivationClustering(Detector):
    """Activation clustering: split each class's activations in two; the smaller part is suspect.

    Per class (by the training label): last-hidden-layer activations of the backdoored
    model (eval mode, no augmentation), reduced to ``dims`` dimensions (ICA in the paper),
    clustered by 2-means. Poisons relabelled into a class are classified there for a
    different reason (the trigger) than its clean images, so their activations form their
    own, smaller cluster.

    Scoring rule (the paper judges each class separately, by the relative size of its
    smaller cluster or by the silhouette score of the split; one ranking over all classes
    needs both): an example scores ``(1 - s) * q`` where ``s`` is the relative size of its
    own cluster within its class and ``q = max(0, silhouette)`` of the class's split.

    * Within a class, the smaller cluster (relative size ``r`` <= 0.5) scores ``(1 - r) q``,
      at least the larger cluster's ``r q``: every small-cluster example outranks the
      larger cluster of its class.
    * Across classes, a class whose smaller cluster is relatively larger (a natural split)
      scores lower, and so does a class whose split is weak: k-means splits every class in
      two, but only a sub-population with its own reason to be classified there (the
      trigger) stands apart. Relative size alone ranked natural sub-styles of clean digit
      classes (smaller clusters of 18-19%) above a 25% poison cluster; the silhouette
      (0.23 for the poisoned class, <= 0.12 for the clean ones) tells them apart.
    * Within a cluster, examples farther from the larger cluster's centroid score higher,
      by a tie-break below a thousandth of the gap between the two clusters' scores, so it
      never reorders the clusters.
    * A class with fewer than ``dims + 1`` (or 3) examples, whose activations do not vary, or whose
      split has a silhouette <= 0 (no structure), scores 0: below every clustered example.

    Known limits: when poisons are half or more of a class (a 10% all-to-one attack on a
    10-class dataset makes the target class about half poison) the smaller cluster can be
    the clean one; and poisons drawn from different source classes may form several groups,
    so the smaller cluster may hold only some of them (the rest then rank by the tie-break).

    Parameters:
        dims: dimensions the activations are reduced to before clustering (10 in the
            paper); capped at the class's feature rank.
        reduce: ``ica`` (FastICA, the paper's choice) or ``pca``.
        n_init: k-means restarts (the best inertia is kept).
        seed: seeds ICA and k-means, so scores are reproducible.

    Input: a :class:`PoisonedSet` (uint8 images) and a model with ``features(x)``. Example::

        DETECTORS.create({"name": "activation_clustering", "seed": 0}).score(model, data)
    """

    dims: int = 10
    reduce: Literal["ica", "pca"] = "ica"
    n_init: int = 10
    seed: int = 0

    def validate(self) -> None:
        check(self.dims >= 1, "detector.dims", f"must be >= 1, got {self.dims}")
        check(self.n_init >= 1, "detector.n_init", f"must be >= 1, got {self.n_init}")
        check(self.seed >= 0, "detector.seed", f"must be >= 0, got {self.seed}")

    def score(self, model: torch.nn.Module, data: PoisonedSet, *, batch_size: int = 1024) -> torch.Tensor:
        return score_per_class(model, data, lambda f: self.class_scores(f.numpy()), batch_size=batch_size)

    def reduced(self, feats: np.ndarray) -> np.ndarray | None:
        """The class's activations in at most ``dims`` dimensions; ``None`` if they do not vary."""
        centred = feats - feats.mean(0, keepdims=True)
        # ICA whitening divides by the singular values: never ask for more components
        # than the activations span (dead ReLU units give zero ones)
        rank = int(np.linalg.matrix_rank(centred))
        k = min(self.dims, rank)
        if k == 0:
            return None
        if self.reduce == "pca":
            return PCA(n_components=k, svd_solver="full").fit_transform(centred)
        with warnings.catch_warnings():
            # an unconverged ICA still gives a usable projection for clustering
            warnings.simplefilter("ignore", ConvergenceWarning)
            ica = FastICA(n_components=k, whiten="unit-variance", max_iter=1000, random_state=self.seed)
            return ica.fit_transform(centred)

    def class_scores(self, feats: np.ndarray) -> np.ndarray:
        """Scores of the examples of one class, from their activations ``(n, D)``."""
        n = feats.shape[0]
        zeros = np.zeros(n, dtype=np.float64)
        if n < max(self.dims + 1, 3):  # a silhouette needs 2 clusters of which one has >= 2 examples
            return zeros
        z = self.reduced(feats)
        if z is None or not np.isfinite(z).all():
            return zeros
        with warnings.catch_warnings():
            # fewer distinct points than clusters: handled below as "no split"
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=2, n_init=self.n_init, random_state=self.seed).fit(z)
        assign = km.labels_
        sizes = np.bincount(assign, minlength=2)
        if sizes.min() == 0:
            return zeros
        # the smaller cluster; on equal sizes the one k-means numbered 1 (seeded, so fixed)
        small = int(np.argmin(sizes)) if sizes[0] != sizes[1] else 1
        large = 1 - small
        # how well the split fits, in [-1, 1]; <= 0: no better than a random split
        separation = max(0.0, float(silhouette_score(z, assign)))
        r = sizes[small] / n
        base = np.where(assign == small, 1.0 - r, r) * separation
        gap = (1.0 - 2.0 * r) * separation  # small-cluster score minus large-cluster score
        dist = np.linalg.norm(z - km.cluster_centers_[large], axis=1)
        t = dist / (dist + np.median(dist) + 1e-12)  # in [0, 1): farther from the large centroid -> nearer 1
        return base + TIE * gap * t

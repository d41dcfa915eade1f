"""Detectors: score every training example for suspicion, registered in :data:`DETECTORS`."""

from abl.detectors import activation_clustering, loss, spectral  # noqa: F401  (registration)
from abl.detectors.base import DETECTORS, Detector, extract_features, isolate
from abl.detectors.metrics import detection_metrics

__all__ = ["DETECTORS", "Detector", "detection_metrics", "extract_features", "isolate"]

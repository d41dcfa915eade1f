"""The model zoo. Importing this package registers every model in :data:`MODELS`.

``MODELS.create({"name": "wrn", "depth": 16, "widen": 1}).build(num_classes, image_size)``
returns an ``nn.Module`` that maps float images in [0, 1], (N, 3, H, W), to logits
(N, num_classes), with ``features(x)`` -> (N, D) and the final linear layer ``fc`` so that
``model.fc(model.features(x)) == model(x)``; ``feature_maps(x)`` gives the last conv map.

Registered: ``wrn``, ``resnet18``, ``resnet34``, ``preact_resnet18``, ``small_cnn``.
"""

from __future__ import annotations

from abl.models import preact_resnet, resnet, small_cnn, wrn
from abl.models.registry import MODELS
from abl.models.resnet import ImageClassifier

__all__ = ["MODELS", "ImageClassifier", "preact_resnet", "resnet", "small_cnn", "wrn"]

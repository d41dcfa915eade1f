"""A small, fast CNN for demos and tests (e.g. 16x16 sklearn digits on a CPU).

Three conv-BN-ReLU blocks of widths ``width``, ``2*width``, ``4*width``, with 2x2 max
pooling after the first two, then global average pooling and a linear layer. Any input
size of at least 4 pixels works. Not a model from a paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from abl.config import check
from abl.models.registry import MODELS
from abl.models.resnet import ImageClassifier, check_build_args, init_weights


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SmallCNN(ImageClassifier):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *conv_bn_relu(3, w),
            nn.MaxPool2d(2),
            *conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w),
        )
        self.fc = nn.Linear(4 * w, num_classes)
        init_weights(self)


@MODELS.register("small_cnn")
@dataclass
class SmallCNNSpec:
    """A three-block CNN (conv-BN-ReLU x3, widths ``width``/2x/4x), global average pool,
    linear; about 95k parameters at ``width=32``. Trains to >95% on sklearn digits in a
    few CPU seconds."""

    width: int = 32

    def validate(self) -> None:
        check(self.width >= 1, "model.width", f"must be >= 1, got {self.width}")

    def build(self, num_classes: int, image_size: int) -> SmallCNN:
        check_build_args(num_classes, image_size)
        return SmallCNN(self.width, num_classes)

"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-16-1 (about 175k parameters at 10 classes) is the model of the ABL paper (Li et al.,
NeurIPS 2021) for CIFAR-10 and GTSRB. The blocks are pre-activation basic blocks
(He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from abl.config import check
from abl.models.registry import MODELS
from abl.models.resnet import ImageClassifier, check_build_args, init_weights


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus the shortcut.

    Where the width or stride changes, the shortcut is a 1x1 conv applied to the
    pre-activated input (as in the authors' code); otherwise it is the identity.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = stride != 1 or in_planes != planes
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if self.projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        # Fixed at construction, so no data-dependent branch for torch.compile.
        residual = self.shortcut(act) if self.projection else x
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + residual


class WideResNet(ImageClassifier):
    """conv3x3(16) -> three groups of n wide blocks (widths 16k, 32k, 64k; strides 1, 2, 2)
    -> BN-ReLU -> global average pool -> linear, with depth = 6n + 4."""

    def __init__(self, depth: int, widen: int, dropout: float, num_classes: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)]
        in_planes = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(WideBlock(in_planes, width, stride if i == 0 else 1, dropout))
                in_planes = width
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)


@MODELS.register("wrn")
@dataclass
class WRN:
    """WideResNet-``depth``-``widen`` (Zagoruyko & Komodakis 2016).

    ``depth`` must be 6n + 4 (10, 16, 22, 28, 40...); ``widen`` multiplies the group
    widths 16/32/64; ``dropout`` is the rate between the two convs of each block (0 as
    in ABL). WRN-16-1 has about 175k parameters at 10 classes.
    """

    depth: int = 16
    widen: int = 1
    dropout: float = 0.0

    def validate(self) -> None:
        check(self.depth >= 10 and (self.depth - 4) % 6 == 0, "model.depth", f"must be 6n+4 with n >= 1 (10, 16, 22, 28, 40...), got {self.depth}")
        check(self.widen >= 1, "model.widen", f"must be >= 1, got {self.widen}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")

    def build(self, num_classes: int, image_size: int) -> WideResNet:
        check_build_args(num_classes, image_size)
        return WideResNet(self.depth, self.widen, self.dropout, num_classes)

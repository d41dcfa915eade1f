"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks",
ECCV 2016), with the CIFAR stem (3x3 stride-1 conv, no max pool).

The usual backdoor-benchmark model for CIFAR-sized inputs; an adaptive average pool makes
other input sizes work too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from abl.models.registry import MODELS
from abl.models.resnet import ImageClassifier, check_build_args, init_weights, make_stage


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the shortcut, with nothing after the
    addition. Where the width or stride changes, the shortcut is a 1x1 conv applied to
    the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.projection = stride != 1 or in_planes != planes
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if self.projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        residual = self.shortcut(act) if self.projection else x
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        return out + residual


class PreActResNet(ImageClassifier):
    """conv3x3(64) -> four stages of pre-activation blocks (64/128/256/512, strides
    1/2/2/2) -> BN-ReLU -> global average pool -> linear."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)]
        in_planes = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers.append(make_stage(PreActBlock, in_planes, width, n, 1 if i == 0 else 2))
            in_planes = width
        # The final BN-ReLU of the pre-activation design (the last block ends in an addition).
        layers += [nn.BatchNorm2d(512), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)


@MODELS.register("preact_resnet18")
@dataclass
class PreActResNet18:
    """Pre-activation ResNet-18 (He et al. 2016, Identity Mappings): [2, 2, 2, 2]
    pre-activation basic blocks, CIFAR stem, about 11.2M parameters. No parameters."""

    def build(self, num_classes: int, image_size: int) -> PreActResNet:
        check_build_args(num_classes, image_size)
        return PreActResNet((2, 2, 2, 2), num_classes)

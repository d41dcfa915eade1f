"""ResNet-18 / ResNet-34 with basic blocks (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016), plus the classifier base that every model in the zoo shares.

ResNet-34 on an ImageNet subset is the ABL paper's model for that dataset. The stem is
chosen per input size: the ImageNet stem (7x7 stride-2 conv, 3x3 max pool) throws away
too much of a 32x32 image, so small images get the usual CIFAR stem (3x3 stride-1 conv,
no pool). An adaptive average pool makes any input size work.

Shared contract (:class:`ImageClassifier`): input is float (N, 3, H, W) in [0, 1] (no
normalisation), ``forward(x)`` gives logits (N, num_classes), ``feature_maps(x)`` the last
convolutional map (N, D, h, w), ``features(x)`` its global average (N, D), and ``fc`` is
the final ``nn.Linear``, so ``model.fc(model.features(x))`` equals ``model(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from abl.config import check
from abl.models.registry import MODELS


def init_weights(module: nn.Module) -> None:
    """Standard initialisation: Kaiming-normal convs (fan_out, ReLU), BN weight 1 and
    bias 0, linear layers with PyTorch's default weight init and zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_build_args(num_classes: int, image_size: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


class ImageClassifier(nn.Module):
    """``body`` (conv feature extractor) -> global average pool -> ``fc``.

    Subclasses set ``self.body`` (a module mapping (N, 3, H, W) to (N, D, h, w)) and
    ``self.fc`` (``nn.Linear(D, num_classes)``). Nothing in the forward pass branches on
    data, so the models trace under ``torch.compile(fullgraph=True)``.
    """

    body: nn.Module
    fc: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def feature_dim(self) -> int:
        """D, the width of :meth:`features` (``fc.in_features``)."""
        return self.fc.in_features

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional activations, (N, D, h, w), before pooling."""
        return self.body(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (N, D): the globally average-pooled feature maps."""
        return torch.flatten(self.pool(self.body(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the addition.
    The shortcut is a 1x1 conv + BN where the stride or width changes (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def make_stage(block: type[nn.Module], in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [block(in_planes, planes, stride)]
    layers += [block(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(ImageClassifier):
    """A basic-block ResNet: stem, four stages of widths 64/128/256/512 (strides
    1/2/2/2), global average pool, linear."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int, stem: Literal["cifar", "imagenet"]) -> None:
        super().__init__()
        if stem == "cifar":
            stem_layers: list[nn.Module] = [
                nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            ]
        else:
            stem_layers = [
                nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        widths = (64, 128, 256, 512)
        stages = []
        in_planes = 64
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stages.append(make_stage(BasicBlock, in_planes, width, n, 1 if i == 0 else 2))
            in_planes = width
        self.body = nn.Sequential(*stem_layers, *stages)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)


def resolve_stem(stem: str, image_size: int) -> Literal["cifar", "imagenet"]:
    """``"auto"`` is the CIFAR stem for images up to 64 pixels, the ImageNet stem above."""
    if stem == "auto":
        return "cifar" if image_size <= 64 else "imagenet"
    return stem  # type: ignore[return-value]


@dataclass
class _ResNetSpec:
    stem: Literal["auto", "cifar", "imagenet"] = "auto"

    blocks = (2, 2, 2, 2)

    def validate(self) -> None:
        check(self.stem in ("auto", "cifar", "imagenet"), "model.stem", "must be auto, cifar or imagenet")

    def build(self, num_classes: int, image_size: int) -> ResNet:
        check_build_args(num_classes, image_size)
        return ResNet(self.blocks, num_classes, resolve_stem(self.stem, image_size))


@MODELS.register("resnet18")
@dataclass
class ResNet18(_ResNetSpec):
    """ResNet-18 (He et al. 2016): [2, 2, 2, 2] basic blocks, about 11.2M parameters.

    ``stem``: ``"cifar"`` (3x3 stride-1 conv, no max pool), ``"imagenet"`` (7x7 stride-2
    conv + 3x3 max pool) or ``"auto"`` (cifar when image_size <= 64, else imagenet).
    """

    blocks = (2, 2, 2, 2)


@MODELS.register("resnet34")
@dataclass
class ResNet34(_ResNetSpec):
    """ResNet-34 (He et al. 2016): [3, 4, 6, 3] basic blocks, about 21.3M parameters; the
    ABL paper's model for its ImageNet subset. ``stem`` as for ``resnet18``."""

    blocks = (3, 4, 6, 3)

"""The ten alternative unlearners of the ABL paper's Table 8 (Li et al., NeurIPS 2021,
appendix A.4 defines them, B.7 reports them: all but ABL left BadNets' ASR near 100%).

Image- and label-based methods change ``D_b`` (noise, new labels) and train on
``D_b* + D_c``; model-based ones discard ``D_b`` and train on ``D_c``. The appendix does not
say whether the image- and label-based methods train from the backdoored model or from
scratch, nor for how long: we fine-tune the model the isolation left (``start:
backdoored``, as Table 8's "Backdoored -> After Unlearning" columns read) for 20 epochs at
lr 0.01 with the augmentation the appendix gives its other defenses (A.3: crop, flip,
Cutout 9); ``start: scratch`` trains a freshly initialised model instead. Every choice is a
parameter, recorded with the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from abl.config import check
from abl.data.loader import AugmentConfig, to_float
from abl.metrics import phase_metrics
from abl.engine import Engine
from abl.errors import ConfigError
from abl.unlearning.base import UNLEARNERS, Unlearner, UnlearnContext, fresh_model


@dataclass
class Retrain(Unlearner):
    """Common shape: train ``engine.model`` on a (modified) training set.

    Parameters:
        epochs: training epochs (20).
        lr: the starting learning rate (0.01).
        milestones: epochs at which the learning rate is multiplied by ``lr_factor``
            (none by default).
        lr_factor: what the learning rate is multiplied by at each milestone (0.1).
        augment: crop + flip + Cutout 9 (the appendix's augmentation for defenses).
        start: ``backdoored`` fine-tunes the model the isolation left; ``scratch`` trains
            a freshly initialised one (seeded).
    """

    method_type: ClassVar[str] = "image-based"

    epochs: int = 20
    lr: float = 0.01
    milestones: list[int] = field(default_factory=list)
    lr_factor: float = 0.1
    augment: bool = True
    start: Literal["backdoored", "scratch"] = "backdoored"

    def validate(self) -> None:
        check(self.epochs >= 1, "unlearner.epochs", "must be >= 1")
        check(self.lr > 0, "unlearner.lr", "must be > 0")
        check(0 < self.lr_factor <= 1, "unlearner.lr_factor", "must be in (0, 1]")

    def total_epochs(self) -> int:
        return self.epochs

    def modify(
        self, engine: Engine, ctx: UnlearnContext, gen: torch.Generator
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | float]:
        """(images, labels, smoothing) to train on; None keeps ``engine.data``'s."""
        return None, None, 0.0

    def train_index(self, engine: Engine, ctx: UnlearnContext) -> torch.Tensor | None:
        """The examples trained on (None: all; discarding methods: ``D_c``)."""
        clean = ctx.clean_index(len(engine.data), engine.device)
        if self.discards_isolated:
            return clean
        return None if ctx.clean is None else torch.cat([ctx.isolated, clean])

    def prepare(self, engine: Engine) -> None:
        """Set up the model to train (after ``start``); e.g. freeze layers."""

    def unlearn(self, engine: Engine, ctx: UnlearnContext) -> dict[str, float]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(engine.seed * 7919 + 17)
        images, labels, smoothing = self.modify(engine, ctx, gen)
        images = ctx.images if images is None else images
        labels = ctx.labels if labels is None else labels
        images, labels = self._keep_modified(engine, ctx, images, labels)
        if self.start == "scratch":
            fresh_model(engine, engine.seed + 1)
        self.prepare(engine)
        engine.run_phase(
            "unlearning",
            epochs=self.epochs,
            lr=self.lr,
            milestones=self.milestones,
            lr_factor=self.lr_factor,
            index=self.train_index(engine, ctx),
            augment=AugmentConfig() if self.augment else None,
            batch_size=ctx.batch_size,
            nesterov=ctx.nesterov,
            freeze_bn=self.freeze_bn(),
            smoothing=smoothing,
            images=images,
            labels=labels,
        )
        self.finish(engine)
        return {**phase_metrics(engine), "stage_s": time.perf_counter() - t0}

    def freeze_bn(self) -> bool:
        return False

    @staticmethod
    def _keep_modified(
        engine: Engine, ctx: UnlearnContext, images: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keep ``D_b``'s modified rows in ``engine.state``. A resumed run recomputes
        ``modify`` before its model is restored (gradients, a teacher's predictions), so it
        takes the rows the interrupted run trained on from its checkpoint instead."""
        saved = engine.state.setdefault("unlearner", {})
        iso = ctx.isolated
        for key, full in (("images", images), ("labels", labels)):
            if full is None:
                continue
            if key in saved:
                full[iso] = saved[key].to(full.device)
            else:
                saved[key] = full[iso].detach().clone()
        return images, labels

    def finish(self, engine: Engine) -> None:
        """Undo what ``prepare`` changed on the model (e.g. unfreeze)."""


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


@UNLEARNERS.register("pixel_noise")
@dataclass
class PixelNoise(Retrain):
    """Gaussian noise added to every pixel of ``D_b`` (appendix A.4, "Pixel Noise").

    Parameters:
        sigma: standard deviation of the noise on the [0, 1] pixel scale (0.1; the
            appendix gives none).
    """

    sigma: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(self.sigma > 0, "unlearner.sigma", "must be > 0")

    def noise_mask(self, engine: Engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None

    def modify(self, engine, ctx, gen):
        images = ctx.images_of(engine).clone()
        iso = ctx.isolated
        x = to_float(images[iso])
        noise = torch.randn(x.shape, generator=gen).to(x.device) * self.sigma
        mask = self.noise_mask(engine, x, ctx.labels_of(engine)[iso])
        if mask is not None:
            noise = noise * mask
        images[iso] = _to_uint8(x + noise)
        return images, None, 0.0


@UNLEARNERS.register("grad_noise")
@dataclass
class GradNoise(PixelNoise):
    """Gaussian noise on the quarter of each ``D_b`` image's pixel values with the largest
    input gradient of the loss under the current model (appendix A.4, "Grad Noise").

    Parameters:
        quantile: share of each image's values that get noise (0.25: "the quarter").
    """

    quantile: float = 0.25

    def validate(self) -> None:
        super().validate()
        check(0 < self.quantile <= 1, "unlearner.quantile", "must be in (0, 1]")

    def noise_mask(self, engine: Engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = engine.model
        was_training = model.training
        model.eval()
        grads = []
        try:
            for s in range(0, len(x), engine.cfg.eval_batch_size):
                xb = x[s : s + engine.cfg.eval_batch_size].clone().requires_grad_(True)
                loss = F.cross_entropy(model(xb).float(), y[s : s + len(xb)], reduction="sum")
                (g,) = torch.autograd.grad(loss, xb)
                grads.append(g.abs())
        finally:
            model.train(was_training)
            model.zero_grad(set_to_none=True)
        g = torch.cat(grads).flatten(1)
        k = max(1, int(round(self.quantile * g.shape[1])))
        top = g.topk(k, dim=1).indices
        mask = torch.zeros_like(g).scatter_(1, top, 1.0)
        return mask.view_as(x)


@UNLEARNERS.register("label_shuffling")
@dataclass
class LabelShuffling(Retrain):
    """A random permutation of ``D_b``'s labels (appendix A.4, "Label Shuffling"). Against
    an all-to-one attack the isolated labels are mostly the target, so the permutation
    barely changes them: the paper's 99.98% ASR."""

    method_type: ClassVar[str] = "label-based"

    def modify(self, engine, ctx, gen):
        labels = ctx.labels_of(engine).clone()
        iso = ctx.isolated
        perm = torch.randperm(len(iso), generator=gen).to(iso.device)
        labels[iso] = ctx.labels_of(engine)[iso][perm]
        return None, labels, 0.0


@UNLEARNERS.register("label_uniform")
@dataclass
class LabelUniform(Retrain):
    """``D_b``'s labels replaced by uniformly random classes (appendix A.4, "Label Uniform")."""

    method_type: ClassVar[str] = "label-based"

    def modify(self, engine, ctx, gen):
        labels = ctx.labels_of(engine).clone()
        iso = ctx.isolated
        n_classes = int(engine.data.labels.max()) + 1
        n_classes = max(n_classes, int(engine.test.labels.max()) + 1)
        labels[iso] = torch.randint(0, n_classes, (len(iso),), generator=gen).to(labels.device)
        return None, labels, 0.0


@UNLEARNERS.register("label_smoothing")
@dataclass
class LabelSmoothingUnlearn(Retrain):
    """Label smoothing on ``D_b`` only: its one-hot labels lose confidence (appendix A.4,
    "Label Smoothing").

    Parameters:
        smoothing_value: the smoothing of ``D_b``'s labels (0.4, the larger of the values
            the appendix uses for isolation; it gives none for unlearning).
    """

    method_type: ClassVar[str] = "label-based"
    smoothing_value: float = 0.4

    def validate(self) -> None:
        super().validate()
        check(0 < self.smoothing_value <= 1, "unlearner.smoothing_value", "must be in (0, 1]")

    def modify(self, engine, ctx, gen):
        eps = torch.zeros(len(engine.data), device=engine.device)
        eps[ctx.isolated] = self.smoothing_value
        return None, None, eps


@UNLEARNERS.register("self_learning")
@dataclass
class SelfLearning(Retrain):
    """``D_b`` relabelled by a model trained from scratch on ``D_c`` (appendix A.4,
    "Self-learning"), then training on ``D_b* + D_c``.

    Parameters:
        teacher_epochs: epochs of the from-scratch model trained on ``D_c`` that relabels
            ``D_b`` (100, the no-defense schedule's).
        teacher_lr: that model's starting learning rate (0.1).
        teacher_milestones: epochs at which its learning rate is divided by 10 ([20, 70]).
    """

    method_type: ClassVar[str] = "label-based"
    teacher_epochs: int = 100
    teacher_lr: float = 0.1
    teacher_milestones: list[int] = field(default_factory=lambda: [20, 70])

    def validate(self) -> None:
        super().validate()
        check(self.teacher_epochs >= 1, "unlearner.teacher_epochs", "must be >= 1")
        check(self.teacher_lr > 0, "unlearner.teacher_lr", "must be > 0")

    def total_epochs(self) -> int:
        return self.epochs + self.teacher_epochs

    def modify(self, engine, ctx, gen):
        # the teacher trains in the engine's own model, which is then put back
        saved = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        fresh_model(engine, engine.seed + 2)
        clean = ctx.clean_index(len(engine.data), engine.device)
        engine.run_phase(
            "teacher", epochs=self.teacher_epochs, lr=self.teacher_lr, milestones=self.teacher_milestones,
            index=clean, batch_size=ctx.batch_size, nesterov=ctx.nesterov, images=ctx.images, labels=ctx.labels,
        )
        labels = ctx.labels_of(engine).clone()
        labels[ctx.isolated] = engine.predict(ctx.isolated)
        engine.model.load_state_dict(saved)
        return None, labels, 0.0


@UNLEARNERS.register("finetune_all")
@dataclass
class FinetuneAll(Retrain):
    """Fine-tune every layer on ``D_c``; ``D_b`` is discarded (appendix A.4)."""

    method_type: ClassVar[str] = "model-based"
    discards_isolated: ClassVar[bool] = True


@UNLEARNERS.register("finetune_last")
@dataclass
class FinetuneLast(FinetuneAll):
    """Fine-tune only the last (linear) layer on ``D_c``, everything before it frozen,
    BatchNorm statistics included (appendix A.4, "Finetuning Last Layers")."""

    def prepare(self, engine: Engine) -> None:
        last = _last_linear(engine.model)
        keep = {id(p) for p in last.parameters()}
        self._frozen = [p for p in engine.model.parameters() if id(p) not in keep and p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)

    def freeze_bn(self) -> bool:
        return True

    def finish(self, engine: Engine) -> None:
        for p in getattr(self, "_frozen", []):
            p.requires_grad_(True)


def _last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError(f"model {type(model).__name__} has no linear layer to fine-tune")
    return linears[-1]


@UNLEARNERS.register("retrain")
@dataclass
class RetrainScratch(FinetuneAll):
    """Train a freshly initialised model on ``D_c`` with the no-defense schedule
    (appendix A.4, "Re-training from Scratch")."""

    epochs: int = 100
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [20, 70])
    augment: bool = False
    start: Literal["backdoored", "scratch"] = "scratch"


@UNLEARNERS.register("finetune_imagenet")
@dataclass
class FinetuneImageNet(FinetuneAll):
    """Replace the model by an ImageNet-pretrained ResNet-34 and fine-tune its last block
    (``layer4``) and a new classifier on ``D_c`` (appendix A.4, "Finetuning ImageNet
    Model"). Images are normalised with the ImageNet statistics and fed at their own size
    (or ``resize``); the run's saved model is then this ResNet-34.

    Parameters:
        weights: ``imagenet`` (torchvision's IMAGENET1K_V1, downloaded on first use) or the
            path of a ResNet-34 state dict in torchvision's layout (``.safetensors``, or a
            ``.pt``/``.pth`` read with ``weights_only=True``).
        resize: resize images to this size before the network (0: as they are; 224 is
            ImageNet's, at 49x the cost for 32-pixel images).
    """

    weights: str = "imagenet"
    resize: int = 0

    def validate(self) -> None:
        super().validate()
        check(self.resize >= 0, "unlearner.resize", "must be >= 0 (0: no resize)")
        check(self.start == "backdoored", "unlearner.start", "the ImageNet model is the starting point; use 'backdoored'")
        # fail when the config is read, not after the isolation has trained for an hour
        check(self.weights == "imagenet" or Path(self.weights).is_file(), "unlearner.weights",
              f"no file {self.weights}; give a ResNet-34 state dict or 'imagenet'")

    def prepare(self, engine: Engine) -> None:
        n_classes = int(engine.model.fc.out_features) if hasattr(engine.model, "fc") else int(engine.test.labels.max()) + 1
        engine.replace_model(imagenet_resnet34(self.weights, n_classes, self.resize))


def imagenet_resnet34(weights: str, num_classes: int, resize: int = 0) -> torch.nn.Module:
    """torchvision's ResNet-34 with ``weights``, a new ``num_classes`` head, everything but
    ``layer4`` and the head frozen, behind ImageNet input normalisation."""
    import torchvision

    if weights == "imagenet":
        net = torchvision.models.resnet34(weights=torchvision.models.ResNet34_Weights.IMAGENET1K_V1)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"'unlearner.weights': no file {path}; give a ResNet-34 state dict or 'imagenet'")
        net = torchvision.models.resnet34()
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001  (any unreadable or mismatched file)
            raise ConfigError(f"'unlearner.weights': {path} is not a torchvision ResNet-34 state dict ({exc})") from None
    net.fc = torch.nn.Linear(net.fc.in_features, num_classes)
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(("layer4.", "fc.")))
    return _ImageNetInput(net, resize)


class _ImageNetInput(torch.nn.Module):
    """ImageNet normalisation (and an optional resize) in front of a torchvision model."""

    def __init__(self, net: torch.nn.Module, resize: int) -> None:
        super().__init__()
        self.net = net
        self.resize = resize
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)

    def train(self, mode: bool = True) -> _ImageNetInput:
        super().train(mode)
        # the frozen blocks keep ImageNet's BatchNorm statistics; only layer4 adapts
        for name, m in self.net.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not name.startswith("layer4"):
                m.eval()
        return self

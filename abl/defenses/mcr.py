"""Mode connectivity repair (Zhao, Chen, Das, Natesan Ramamurthy & Lin, "Bridging Mode
Connectivity in Loss Landscapes and Adversarial Robustness", ICLR 2020,
https://arxiv.org/abs/2005.00060).

Two models that solve the task are joined by a quadratic Bezier curve
``phi(t) = (1 - t)^2 w0 + 2 t (1 - t) theta + t^2 w1`` whose control point ``theta`` is
trained on the defender's clean data so that every point of the curve fits it (Garipov et
al., NeurIPS 2018). Backdoored endpoints are joined through a region of clean-only
solutions: the paper finds that models in the middle of the path keep most of the clean
accuracy and lose the backdoor. Here ``w0`` is the backdoored model and ``w1`` the same
model fine-tuned on the clean subset (the setting with one backdoored model); the curve is
trained for 100 epochs (the ABL paper's appendix A.3), evaluated at evenly spaced ``t``
with BatchNorm statistics recomputed on the clean data at each point, and the model at
``t`` (a parameter) is the result. The run stores the whole curve (t, CA, ASR).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.func import functional_call

from abl.config import check
from abl.data.loader import AugmentConfig, to_float
from abl.defenses.base import DEFENSES
from abl.defenses.posttrain import PostTraining
from abl.engine import Engine
from abl.metrics import METRIC_KEYS, phase_metrics


def bezier(t: float, w0: torch.Tensor, theta: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """The quadratic Bezier point at ``t`` between ``w0`` and ``w1`` with control ``theta``."""
    return (1 - t) ** 2 * w0 + 2 * t * (1 - t) * theta + t**2 * w1


class CurveModel(torch.nn.Module):
    """A model whose weights are a point of a Bezier curve: its only parameters are the
    control point; the endpoints are fixed. In training mode each forward pass draws its
    own ``t`` uniformly (one per batch, as Garipov et al.); in eval mode it uses ``t``."""

    def __init__(self, base: torch.nn.Module, w1: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        names = [n for n, _ in base.named_parameters()]
        self._names = names
        params = dict(base.named_parameters())
        # the control point starts at the midpoint of the endpoints
        self.theta = torch.nn.ParameterList(
            [torch.nn.Parameter(((params[n].detach() + w1[n]) / 2).clone()) for n in names]
        )
        for i, n in enumerate(names):
            self.register_buffer(f"w0_{i}", params[n].detach().clone())
            self.register_buffer(f"w1_{i}", w1[n].detach().clone())
        base.requires_grad_(False)
        self.t = 0.5

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        return {n: bezier(t, getattr(self, f"w0_{i}"), self.theta[i], getattr(self, f"w1_{i}"))
                for i, n in enumerate(self._names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's generator: its state is in every checkpoint, so a resumed run draws on
        t = float(torch.rand(())) if self.training else self.t
        return functional_call(self.base, self.weights(t), (x,))


@DEFENSES.register("mcr")
@dataclass
class MCR(PostTraining):
    """Train a Bezier curve from the backdoored model to its clean fine-tuned copy, and take
    the model at ``t``.

    Parameters:
        t: the point of the curve kept as the result (0: the backdoored model, 1: the
            fine-tuned one; 0.4 by default, between the endpoints where the paper finds
            the backdoor gone).
        finetune_epochs: epochs of fine-tuning on the clean subset that make the curve's
            second endpoint (10).
        finetune_lr: that fine-tuning's learning rate (0.01).
        epochs: epochs of the curve's training (100, the ABL paper's).
        lr: the curve's starting learning rate (0.01).
        milestones: curve epochs at which the learning rate is divided by 10 (null: at
            half and three quarters of ``epochs``, 50 and 75 by default).
        points: how many evenly spaced ``t`` (0 and 1 included) the curve is evaluated at.
        augment: crop + flip + Cutout 9 while training (appendix A.3).
    """

    t: float = 0.4
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    epochs: int = 100
    lr: float = 0.01
    milestones: list[int] | None = None
    points: int = 11
    augment: bool = True

    def validate(self) -> None:
        super().validate()
        check(0 <= self.t <= 1, "defense.t", "must be in [0, 1]")
        check(self.finetune_epochs >= 1, "defense.finetune_epochs", "must be >= 1")
        check(self.epochs >= 1, "defense.epochs", "must be >= 1")
        check(self.finetune_lr > 0 and self.lr > 0, "defense.lr", "learning rates must be > 0")
        check(self.points >= 2, "defense.points", "must be >= 2 (the endpoints)")
        if self.milestones is None:
            self.milestones = [self.epochs // 2, (3 * self.epochs) // 4]

    def purify_epochs(self) -> int:
        return self.finetune_epochs + self.epochs

    def purify(self, engine: Engine, clean: torch.Tensor) -> dict[str, dict[str, float]]:
        augment = AugmentConfig() if self.augment else None
        base = engine.model
        w0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
        engine.run_phase("finetune", epochs=self.finetune_epochs, lr=self.finetune_lr, index=clean, augment=augment)
        steps = {"finetuned": phase_metrics(engine)}
        saved = engine.state.setdefault("mcr", {})  # a resumed run has not retrained it
        if "w1" not in saved:
            saved["w1"] = {k: v.detach().clone() for k, v in base.state_dict().items()}
        base.load_state_dict(w0)
        curve = CurveModel(base, saved["w1"])
        engine.replace_model(curve)
        try:
            engine.run_phase("curve", epochs=self.epochs, lr=self.lr, milestones=self.milestones or [],
                             index=clean, augment=augment)
        finally:
            base.requires_grad_(True)
        points = []
        for i in range(self.points):
            t = i / (self.points - 1)
            model = self._model_at(curve, t, engine, clean)
            engine.replace_model(model)
            m = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
            points.append({"t": t, **m})
        engine.replace_model(self._model_at(curve, self.t, engine, clean))
        chosen = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        steps["curve"] = {"t": self.t, **chosen}
        if hasattr(self, "notes"):
            self.notes["curve"] = points  # the report draws it
        return steps

    @staticmethod
    @torch.no_grad()
    def _model_at(curve: CurveModel, t: float, engine: Engine, clean: torch.Tensor) -> torch.nn.Module:
        """A plain copy of the base model with the curve's weights at ``t`` and BatchNorm
        statistics recomputed on the clean subset (the endpoints' do not hold in between)."""
        model = copy.deepcopy(curve.base)
        model.load_state_dict({**model.state_dict(), **{k: v.detach() for k, v in curve.weights(t).items()}})
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if bns:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the clean subset
            model.train()
            bs = engine.cfg.eval_batch_size
            for s in range(0, len(clean), bs):
                engine._forward(model, to_float(engine.data.images[clean[s : s + bs]]))
            for m in bns:
                m.momentum = 0.1
        return model.eval()

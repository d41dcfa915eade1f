"""Sleeper Agent: a hidden-trigger, clean-label backdoor crafted by gradient matching
(Souri, Fowl, Chellappa, Goldblum & Goldstein, "Sleeper Agent: Scalable Hidden Trigger
Backdoors for Neural Networks Trained from Scratch", NeurIPS 2022).

Feature collision (:mod:`abl.attacks.fc`) moves target-class images toward the features of
triggered source images under a fixed model, which a victim trained from scratch does not
share. Gradient matching instead perturbs them, within an L-inf budget, so that the
*training gradient* they produce (with their own, correct label) points the same way as the
gradient that would teach a model to send triggered source images to the target:

    min_delta  1 - cos( grad_theta L(f(x + delta), target), grad_theta L(f(s + trigger), target) )

A model that descends on the poisons then takes steps that also learn the trigger. The
surrogate is trained on the clean training set and retrained from scratch on the poisoned
set ``retrains`` times while crafting (the paper's retraining); the poisons are matched in
batches (each batch's gradient against the source gradient), with signed Adam steps
projected onto the budget. Not implemented: ensembles of surrogates and choosing the
poisons by gradient norm (say so when comparing with the paper's numbers).

Measured (all 1,797 digits at 16x16, small-CNN surrogate and victims, every class-0 image
poisoned at 16/255, 120 steps, 3 retrains): the gradient cosine rose from 0.63 to 0.95, yet
victims trained from scratch learned no backdoor (ASR 0% for two seeds), as FC. Whether it
plants on CIFAR-10 at the paper's scale is not measured yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from abl.attacks import surrogate
from abl.attacks.base import ATTACKS
from abl.attacks.fc import FeatureCollision
from abl.config import check
from abl.data.loader import to_float

_BATCH = 128
_SOURCE_IMAGES = 256  # triggered source images whose gradient the poisons match


@ATTACKS.register("sleeper_agent")
@dataclass
class SleeperAgent(FeatureCollision):
    """Sleeper Agent: clean-label target-class images perturbed so that their training
    gradient matches that of triggered source images labelled ``target``.

    Shares FC's trigger (the authors' grid as a ``patch_size`` patch, only at test time),
    source class, budget and cache. Parameters beyond FC's:

    Parameters:
        steps: signed Adam steps on all poisons (250, the paper's).
        lr: Adam step size, in [0, 1] pixel units (0.01).
        retrains: times the surrogate is retrained from scratch on the training set with
            the current poisons during crafting (4, the paper's), so the poisons keep
            working on a model that has learned from them.
        watermark: not used by gradient matching (must stay 0).
    """

    cache_kind: ClassVar[str] = "sleeper_agent"

    steps: int = 250
    lr: float = 0.01
    retrains: int = 4

    def validate(self) -> None:
        super().validate()
        check(self.retrains >= 0, "attack.retrains", "must be >= 0")
        check(self.watermark == 0.0, "attack.watermark", "is a feature-collision option; gradient matching uses none")

    def _source_gradient(self, model: torch.nn.Module, sources: torch.Tensor,
                         params: list[torch.Tensor]) -> list[torch.Tensor]:
        x = self.apply(to_float(sources[:_SOURCE_IMAGES]))
        y = torch.full((len(x),), self.target, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(model(x).float(), y)
        return [g.detach() for g in torch.autograd.grad(loss, params)]

    def extra_key(self) -> dict[str, object]:
        return {"method": "gradient_matching", "retrains": self.retrains, "source_images": _SOURCE_IMAGES}

    def _cosines(self, model: torch.nn.Module, x0: torch.Tensor, delta: torch.Tensor, goal: list[torch.Tensor],
                 backward: bool) -> list[float]:
        """Per batch of poisons, the cosine between its gradient and ``goal``; with
        ``backward``, ``1 - cos`` is back-propagated into ``delta.grad``."""
        params = list(model.parameters())
        goal_norm = torch.sqrt(sum((g * g).sum() for g in goal))  # type: ignore[arg-type]
        out = []
        for b in range(0, len(x0), _BATCH):
            x = (x0[b : b + _BATCH] + delta[b : b + _BATCH]).clamp(0, 1)
            y = torch.full((len(x),), self.target, dtype=torch.long, device=x.device)
            grads = torch.autograd.grad(F.cross_entropy(model(x).float(), y), params, create_graph=backward)
            dot = sum((g * t).sum() for g, t in zip(grads, goal))
            cos = dot / (torch.sqrt(sum((g * g).sum() for g in grads)) * goal_norm + 1e-12)  # type: ignore[arg-type]
            if backward:
                (1 - cos).backward()
            out.append(float(cos.detach()))
        return out

    def _retrain(self, x0: torch.Tensor, delta: torch.Tensor, round_: int) -> torch.nn.Module:
        """A fresh surrogate trained on the training set with the current poisons in it."""
        train, idx, device = self._crafting
        images = train.images.clone()
        images[idx] = (x0 + delta).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        from abl.data.types import ImageSplit

        return surrogate.train_clean_model(
            ImageSplit(images, train.labels), self.num_classes, model={"name": self.surrogate_model},
            epochs=self.surrogate_epochs, lr=self.surrogate_lr, batch_size=self.surrogate_batch_size,
            seed=self.surrogate_seed + 100 + round_, device=device,
        )

    def _collide(self, model: torch.nn.Module, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """uint8 ``images`` perturbed within ``eps`` so their training gradient matches the
        triggered ``sources``' gradient toward the target; the surrogate is retrained on
        the poisoned set ``retrains`` times along the way."""
        x0 = to_float(images)
        delta = torch.zeros_like(x0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        retrain_at = {round(self.steps * (k + 1) / (self.retrains + 1)) for k in range(self.retrains)}

        def prepared(m: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.Tensor]]:
            m.eval().requires_grad_(True)  # a cached surrogate comes frozen; its gradients are the point
            return m, self._source_gradient(m, sources, list(m.parameters()))

        model, goal = prepared(model)
        self.match_before = self._cosines(model, x0, delta.detach(), goal, backward=False)
        for step in range(self.steps):
            if step in retrain_at:
                model, goal = prepared(self._retrain(x0, delta.detach(), step))
            opt.zero_grad(set_to_none=True)
            self._cosines(model, x0, delta, goal, backward=True)
            delta.grad.sign_()  # type: ignore[union-attr]
            opt.step()
            with torch.no_grad():
                delta.clamp_(-self.eps, self.eps)
                delta.copy_((x0 + delta).clamp(0, 1) - x0)
        self.match_after = self._cosines(model, x0, delta.detach(), goal, backward=False)
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        return (x0 + delta.detach()).mul(255).round().clamp(0, 255).to(torch.uint8)

    def fit_metrics(self) -> dict[str, float]:
        """The cosine between the poisons' and the triggered sources' gradients before and
        after crafting (mean over batches; only when crafted in this run, not read from
        the cache)."""
        before, after = getattr(self, "match_before", []), getattr(self, "match_after", [])
        if not before:
            return {}
        return {"grad_cos_before": sum(before) / len(before), "grad_cos_after": sum(after) / len(after)}


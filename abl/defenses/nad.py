"""Neural attention distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021,
https://arxiv.org/abs/2101.05930).

A teacher is fine-tuned from the backdoored model on the defender's clean data; the
backdoored model (the student) is then trained on the same data with cross-entropy plus
an attention-transfer loss (Zagoruyko & Komodakis, ICLR 2017) that pulls the attention
maps of its residual groups toward the teacher's. An attention map is the channel sum of
``|activation|^p``, normalised to unit L2 norm over the spatial positions; the loss is the
mean squared difference, weighted per group by ``betas``.

Defaults: the NAD authors' code for CIFAR-10 (bboylyg/NAD, ``config.py``: betas 0 / 0 /
5000 on the three WRN groups, p = 2, batch 64, lr 0.1 then 0.01 from epoch 2
(``utils/util.py``), SGD with Nesterov momentum), with the ABL paper's 10 epochs of
distillation (appendix A.3; the NAD code runs 20) and its augmentation (crop, flip, Cutout 9).
The teacher's fine-tuning schedule is not in the NAD code (it ships the weights): 10 epochs
at lr 0.01 with the same augmentation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from abl.config import check
from abl.data.loader import AugmentConfig
from abl.defenses.base import DEFENSES
from abl.defenses.posttrain import PostTraining
from abl.engine import Engine
from abl.metrics import phase_metrics
from abl.models.features import residual_groups

def attention_map(fm: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Channel sum of ``|fm|^p``, divided by its L2 norm over the spatial positions."""
    am = fm.float().abs().pow(p).sum(1, keepdim=True)
    return am / (am.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + eps)


@DEFENSES.register("nad")
@dataclass
class NAD(PostTraining):
    """Fine-tune a teacher on clean data, then distil its attention into the backdoored model.

    Parameters:
        betas: attention-loss weight per residual group, aligned to the last groups
            (the authors' CIFAR-10 setting: [0, 0, 5000], only the deepest of WRN's three).
        p: power of the attention map (2).
        teacher_epochs: epochs of the teacher's fine-tuning on the clean subset (10).
        teacher_lr: the teacher's learning rate (0.01).
        epochs: epochs of the attention distillation (10, the authors').
        lr: the distillation's starting learning rate (0.1, the authors').
        milestones: distillation epochs at which the learning rate is multiplied by
            ``lr_factor`` (the authors': [2]).
        lr_factor: what the distillation's learning rate is multiplied by at each
            milestone (0.1).
        batch_size: 64 (the authors').
        nesterov: Nesterov momentum in both phases (the authors': on).
        augment: crop + flip + Cutout 9 in both phases (appendix A.3).
    """

    betas: list[float] = field(default_factory=lambda: [0.0, 0.0, 5000.0])
    p: float = 2.0
    teacher_epochs: int = 10
    teacher_lr: float = 0.01
    epochs: int = 10
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [2])
    lr_factor: float = 0.1
    batch_size: int = 64
    nesterov: bool = True
    augment: bool = True

    def validate(self) -> None:
        super().validate()
        check(len(self.betas) >= 1 and all(b >= 0 for b in self.betas), "defense.betas", "must be >= 0, one per group")
        check(self.p > 0, "defense.p", "must be > 0")
        check(self.teacher_epochs >= 1, "defense.teacher_epochs", "must be >= 1")
        check(self.epochs >= 1, "defense.epochs", "must be >= 1")
        check(self.teacher_lr > 0 and self.lr > 0, "defense.lr", "learning rates must be > 0")
        check(self.batch_size >= 1, "defense.batch_size", "must be >= 1")

    def purify_epochs(self) -> int:
        return self.teacher_epochs + self.epochs

    def purify(self, engine: Engine, clean: torch.Tensor) -> dict[str, dict[str, float]]:
        augment = AugmentConfig() if self.augment else None
        student_state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        engine.run_phase("teacher", epochs=self.teacher_epochs, lr=self.teacher_lr, index=clean, augment=augment,
                         batch_size=self.batch_size, nesterov=self.nesterov)
        steps = {"teacher": phase_metrics(engine)}
        # kept in the engine's state: a run resumed mid-distillation has not retrained it
        saved = engine.state.setdefault("nad", {})
        if "teacher" not in saved:
            saved["teacher"] = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        teacher = copy.deepcopy(engine.model)
        teacher.load_state_dict(saved["teacher"])
        teacher.eval().requires_grad_(False)
        engine.model.load_state_dict(student_state)

        size = int(engine.data.images.shape[-1])
        s_groups, t_groups = residual_groups(engine.model, size), residual_groups(teacher, size)
        if len(self.betas) > len(s_groups):
            raise ValueError(f"{len(self.betas)} betas for a model with {len(s_groups)} residual groups")
        pairs = [(s, t, b) for s, t, b in zip(s_groups[-len(self.betas):], t_groups[-len(self.betas):], self.betas) if b]
        # each hook keeps its module's latest output: the student's from the training step's
        # forward pass, the teacher's from the pass below (evaluation passes in between
        # overwrite them harmlessly)
        acts: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda m, _i, out: acts.__setitem__(id(m), out))
                 for s, t, _ in pairs for m in (s, t)]

        def attention_loss(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                engine._forward(teacher, x)
            return sum(b * F.mse_loss(attention_map(acts[id(s)], self.p), attention_map(acts[id(t)], self.p))
                       for s, t, b in pairs)  # type: ignore[return-value]

        try:
            engine.run_phase("distillation", epochs=self.epochs, lr=self.lr, milestones=self.milestones,
                             lr_factor=self.lr_factor, index=clean, augment=augment, batch_size=self.batch_size,
                             nesterov=self.nesterov, extra_loss=attention_loss if pairs else None)
        finally:
            for h in hooks:
                h.remove()
        steps["distillation"] = phase_metrics(engine)
        return steps

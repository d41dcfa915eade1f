"""Fine-pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018, https://arxiv.org/abs/1805.12185).

A backdoor tends to live in neurons that clean inputs leave dormant. Fine-pruning removes
the channels of the last convolutional layer in increasing order of their mean activation
on clean data until clean accuracy drops by more than a set margin, then fine-tunes the
pruned model on the clean data. For residual networks the "last convolutional layer" is
read as the final feature map (the block output the classifier pools), as in the common
ports of the method to ResNets; a channel is pruned by zeroing its column of the classifier
and masking it while fine-tuning, so the model keeps its architecture and saves as
safetensors. The ABL paper (appendix A.3) prunes "until the CA of the network became lower
than that of the other defense baselines"; the stopping rule is a parameter here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abl.config import check
from abl.data.loader import AugmentConfig
from abl.defenses.base import DEFENSES
from abl.defenses.posttrain import PostTraining
from abl.detectors.base import extract_features
from abl.engine import Engine
from abl.metrics import METRIC_KEYS, phase_metrics


@DEFENSES.register("fine_pruning")
@dataclass
class FinePruning(PostTraining):
    """Prune dormant channels of the last feature map, then fine-tune on clean data.

    Parameters:
        max_ca_drop: stop pruning before the defender's clean accuracy (on the held-out
            part of its clean subset) falls more than this below the unpruned model's
            (0.04: the original paper's 4% on its validation data).
        prune_ratio: prune exactly this share of the channels instead (null: search with
            ``max_ca_drop``).
        max_ratio: never prune more than this share (0.95).
        holdout: share of the clean subset kept to measure the accuracy the search
            watches (0.2); the activations are measured on the rest, and fine-tuning
            uses all of it.
        epochs: epochs of fine-tuning after pruning (10, the schedule of the defenses the
            ABL paper compares).
        lr: the fine-tuning's learning rate (0.01).
        augment: crop + flip + Cutout 9 while fine-tuning (appendix A.3).
    """

    max_ca_drop: float = 0.04
    prune_ratio: float | None = None
    max_ratio: float = 0.95
    holdout: float = 0.2
    epochs: int = 10
    lr: float = 0.01
    augment: bool = True

    def validate(self) -> None:
        super().validate()
        check(0 <= self.max_ca_drop < 1, "defense.max_ca_drop", "must be in [0, 1)")
        check(self.prune_ratio is None or 0 <= self.prune_ratio < 1, "defense.prune_ratio", "must be in [0, 1) or null")
        check(0 < self.max_ratio < 1, "defense.max_ratio", "must be in (0, 1)")
        check(0 < self.holdout < 1, "defense.holdout", "must be in (0, 1)")
        check(self.epochs >= 0, "defense.epochs", "must be >= 0")
        check(self.lr > 0, "defense.lr", "must be > 0")

    def purify_epochs(self) -> int:
        return self.epochs

    def purify(self, engine: Engine, clean: torch.Tensor) -> dict[str, dict[str, float]]:
        model = engine.model
        fc = model.fc  # every model in abl.models: features -> fc
        g = torch.Generator().manual_seed(self.clean_seed + 1)
        perm = clean[torch.randperm(len(clean), generator=g).to(clean.device)]
        n_hold = max(1, int(round(self.holdout * len(clean))))
        held, rest = perm[:n_hold], perm[n_hold:]
        # the decision is kept in the engine's state: a run resumed mid-fine-tuning measures
        # before its model is restored, and must mask the same channels
        saved = engine.state.setdefault("fine_pruning", {})
        if "order" not in saved:
            activation = extract_features(model, engine.data.images[rest], batch_size=engine.cfg.eval_batch_size).mean(0)
            saved["order"] = torch.argsort(activation, stable=True)  # most dormant first
        order = saved["order"]
        width = len(order)
        original = fc.weight.detach().clone()
        base_acc = engine.train_accuracy(held)

        def prune(n: int) -> None:
            with torch.no_grad():
                fc.weight.copy_(original)
                fc.weight[:, order[:n].to(fc.weight.device)] = 0.0

        if "n" in saved:
            n = int(saved["n"])
        elif self.prune_ratio is not None:
            n = int(self.prune_ratio * width)
        else:
            n, step = 0, max(1, width // 64)
            limit = int(self.max_ratio * width)
            while n + step <= limit:
                prune(n + step)
                if engine.train_accuracy(held) < base_acc - self.max_ca_drop:
                    break
                n += step
        saved["n"] = n
        prune(n)
        mask = torch.ones(width, device=fc.weight.device)
        mask[order[:n].to(mask.device)] = 0.0
        pruned_eval = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        steps = {"pruned": {**pruned_eval, "pruned_channels": float(n), "pruned_ratio": n / width,
                            "defender_acc_before": base_acc, "defender_acc_pruned": engine.train_accuracy(held)}}
        if self.epochs:
            # the pruned channels stay silent while fine-tuning: their input to fc is masked
            handle = fc.register_forward_pre_hook(lambda _m, args: (args[0] * mask,))
            try:
                engine.run_phase("fine-tuning", epochs=self.epochs, lr=self.lr, index=clean,
                                 augment=AugmentConfig() if self.augment else None)
            finally:
                handle.remove()
            # no gradient reaches a masked column and weight decay keeps 0 at 0: the saved
            # weights are the pruned model exactly, with no hook needed
            steps["fine-tuning"] = {**phase_metrics(engine), "pruned_channels": float(n)}
        return steps

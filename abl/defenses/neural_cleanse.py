"""Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019).

For every class, the smallest trigger (a mask ``m`` and a pattern ``p``, stamped as
``(1 - m) x + m p``) that sends clean images to that class is reverse-engineered with Adam
on the defender's clean data, minimising cross-entropy toward the class plus ``cost *
|m|_1``. A backdoor's target needs a far smaller mask than the other classes; the anomaly
index of a class is how many (consistency-scaled) median absolute deviations its mask's L1
norm sits below the median, and classes above 2 are flagged. The cost follows the paper's
schedule: it grows by ``cost_multiplier`` after ``patience`` steps in which the reversed
trigger succeeds on at least ``attack_threshold`` of the images, and shrinks by
``cost_multiplier ** 1.5`` after as many in which it does not; the smallest successful mask
is kept. All classes are optimised together, as one batch on the device.

With ``unlearner`` set, the run then follows the ABL paper's appendix B.10 (Table 11): the
flagged class's reversed trigger is stamped on ``stamp_count`` clean images labelled with
that class, and ABL's unlearning (any registered unlearner) removes the link, with the rest
of the clean subset as ``D_c``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from abl.config import check, to_plain
from abl.data.loader import to_float
from abl.defenses.base import DEFENSES
from abl.defenses.posttrain import PostTraining
from abl.engine import Engine
from abl.metrics import METRIC_KEYS
from abl.unlearning import UNLEARNERS, UnlearnContext

#: the MAD of a normal distribution is 0.6745 of its standard deviation
_CONSISTENCY = 1.4826


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """``|norm - median| / (1.4826 * MAD)`` per class, signed negative above the median
    (only small masks are suspicious)."""
    med = norms.median()
    mad = (norms - med).abs().median() * _CONSISTENCY
    index = (norms - med).abs() / mad.clamp_min(1e-12)
    return torch.where(norms < med, index, -index)


@DEFENSES.register("neural_cleanse")
@dataclass
class NeuralCleanse(PostTraining):
    """Reverse-engineer a trigger per class, flag the anomalously small ones.

    Defaults: the authors' code (bolunwang/backdoor at 06875b9, ``gtsrb_visualize_example.py``
    lines 49-68 and ``visualizer.py``): up to 1,000 steps of 31 batches of 32 images, Adam
    at 0.1 (betas 0.5 / 0.9), the cost starting at 0 and set to 1e-3 once the trigger has
    succeeded for ``patience`` steps, then multiplied by 2 (divided by 2 ** 1.5) after 5
    steps above (below) the 0.99 success rate, and early stopping once the cost has moved
    both ways and the smallest successful mask has not shrunk for 25 steps. The authors
    draw their images from the test set; ours come from the defender's clean subset.

    Parameters:
        steps: the most optimisation steps (1,000).
        batches_per_step: batches per step, over which success and mask size are averaged
            (31: the authors' 1,000 images in batches of 32).
        lr: Adam learning rate (0.1).
        batch_size: clean images per batch (32; each is stamped for every class).
        init_cost: the mask L1 weight the cost is set to first (1e-3).
        cost_from_zero: start at cost 0 and set ``init_cost`` after ``patience`` successful
            steps (the authors' default); false: start at ``init_cost``.
        cost_multiplier: the cost schedule's factor up; down is its power 1.5 (2).
        patience: steps above (or below) the success threshold before the cost moves (5).
        early_stop_patience: steps without a smaller successful mask before a class stops,
            once its cost has moved up and down (25).
        early_stop_threshold: a mask counts as smaller below this fraction of the best (1.0).
        attack_threshold: success rate a reversed trigger must reach to count (0.99).
        anomaly_threshold: flag classes whose anomaly index exceeds this (2).
        unlearner: a registered unlearner (e.g. ``{name: gga}``) to unlearn the flagged
            class's reversed trigger with (the ABL paper's Table 11); null: detection only.
        stamp_count: clean images stamped with the reversed trigger for unlearning (500).
    """

    steps: int = 1000
    batches_per_step: int = 31
    lr: float = 0.1
    batch_size: int = 32
    init_cost: float = 1e-3
    cost_from_zero: bool = True
    cost_multiplier: float = 2.0
    patience: int = 5
    early_stop_patience: int = 25
    early_stop_threshold: float = 1.0
    attack_threshold: float = 0.99
    anomaly_threshold: float = 2.0
    unlearner: dict[str, Any] | None = None
    stamp_count: int = 500

    def validate(self) -> None:
        super().validate()
        check(self.steps >= 1, "defense.steps", "must be >= 1")
        check(self.batches_per_step >= 1, "defense.batches_per_step", "must be >= 1")
        check(self.lr > 0, "defense.lr", "must be > 0")
        check(self.batch_size >= 1, "defense.batch_size", "must be >= 1")
        check(self.init_cost > 0, "defense.init_cost", "must be > 0")
        check(self.cost_multiplier > 1, "defense.cost_multiplier", "must be > 1")
        check(self.patience >= 1, "defense.patience", "must be >= 1")
        check(self.early_stop_patience >= 1, "defense.early_stop_patience", "must be >= 1")
        check(0 < self.early_stop_threshold <= 1, "defense.early_stop_threshold", "must be in (0, 1]")
        check(0 < self.attack_threshold <= 1, "defense.attack_threshold", "must be in (0, 1]")
        check(self.stamp_count >= 1, "defense.stamp_count", "must be >= 1")
        if self.unlearner is not None:
            self.unlearner = to_plain(UNLEARNERS.create(self.unlearner, "defense.unlearner"))

    def purify_epochs(self) -> int:
        if self.unlearner is None:
            return 0
        return UNLEARNERS.create(self.unlearner, "defense.unlearner").total_epochs()

    def reverse(self, engine: Engine, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masks (K, 1, H, W), patterns (K, 3, H, W), success (K,), steps (K,)): per class
        the smallest successful trigger (the last one where none succeeded) and the steps
        it ran before stopping. All classes are optimised together, one batch on the device."""
        model = engine.model
        was_training = model.training
        model.eval()
        model.requires_grad_(False)
        images = engine.data.images
        k = int(model.fc.out_features)  # type: ignore[union-attr]
        h, w = images.shape[-2:]
        dev = engine.device
        g = torch.Generator().manual_seed(self.clean_seed + 7)
        # tanh-parameterised, as the authors: mask in (0, 1), pattern in (0, 1)
        mask_p = (torch.rand(k, 1, h, w, generator=g) * 2 - 1).to(dev).requires_grad_(True)
        pattern_p = (torch.rand(k, 3, h, w, generator=g) * 2 - 1).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([mask_p, pattern_p], lr=self.lr, betas=(0.5, 0.9))
        zeros = lambda dtype=torch.long: torch.zeros(k, dtype=dtype, device=dev)  # noqa: E731
        cost = torch.full((k,), 0.0 if self.cost_from_zero else self.init_cost, device=dev)
        set_n, up_n, down_n, stop_n, ran = zeros(), zeros(), zeros(), zeros(), zeros()
        went_up, went_down, done = zeros(torch.bool), zeros(torch.bool), zeros(torch.bool)
        best_norm = torch.full((k,), float("inf"), device=dev)
        stop_best = best_norm.clone()
        best_mask = torch.zeros(k, 1, h, w, device=dev)
        best_pattern = torch.zeros(k, 3, h, w, device=dev)
        success = zeros(torch.float)
        targets = torch.arange(k, device=dev)
        stream = torch.empty(0, dtype=clean.dtype, device=clean.device)
        try:
            for _ in range(self.steps):
                hits, reg, seen = zeros(torch.float), zeros(torch.float), 0
                for _b in range(self.batches_per_step):
                    while len(stream) < min(self.batch_size, len(clean)):  # an endless shuffled stream
                        stream = torch.cat([stream, clean[torch.randperm(len(clean), generator=g).to(clean.device)]])
                    batch, stream = stream[: self.batch_size], stream[self.batch_size :]
                    x = to_float(images[batch])  # (B, 3, H, W)
                    m = (torch.tanh(mask_p) + 1) / 2
                    p = (torch.tanh(pattern_p) + 1) / 2
                    stamped = (1 - m[:, None]) * x[None] + m[:, None] * p[:, None]  # (K, B, 3, H, W)
                    logits = engine._forward(model, stamped.flatten(0, 1)).float().view(k, len(x), -1)
                    ce = F.cross_entropy(logits.transpose(1, 2), targets[:, None].expand(k, len(x)), reduction="none").mean(1)
                    l1 = m.flatten(1).sum(1)
                    opt.zero_grad(set_to_none=True)
                    (ce + cost * l1).sum().backward()
                    opt.step()
                    hits += (logits.argmax(2) == targets[:, None]).float().sum(1).detach()
                    reg += l1.detach()
                    seen += len(x)
                with torch.no_grad():
                    live = ~done
                    ran += live.long()
                    rate, reg = hits / seen, reg / self.batches_per_step
                    ok = rate >= self.attack_threshold
                    better = live & ok & (reg < best_norm)
                    m = (torch.tanh(mask_p) + 1) / 2
                    p = (torch.tanh(pattern_p) + 1) / 2
                    best_norm = torch.where(better, reg, best_norm)
                    best_mask[better], best_pattern[better] = m[better], p[better]
                    success = torch.where(better, rate, success)
                    never = live & torch.isinf(best_norm)  # the latest, for classes never reached
                    best_mask[never], best_pattern[never] = m[never], p[never]
                    success = torch.where(never, rate, success)
                    # early stop: the cost has moved both ways and the best mask stopped shrinking
                    found = live & torch.isfinite(best_norm)
                    stale = best_norm >= self.early_stop_threshold * stop_best
                    stop_n = torch.where(found, torch.where(stale, stop_n + 1, torch.zeros_like(stop_n)), stop_n)
                    stop_best = torch.where(live, torch.minimum(stop_best, best_norm), stop_best)
                    done = done | (live & went_up & went_down & (stop_n >= self.early_stop_patience))
                    if bool(done.all()):
                        break
                    live = ~done
                    # the cost schedule
                    start = live & (cost == 0) & ok
                    set_n = torch.where(start, set_n + 1, torch.zeros_like(set_n))
                    init = start & (set_n >= self.patience)
                    cost = torch.where(init, torch.full_like(cost, self.init_cost), cost)
                    up_n = torch.where(init, torch.zeros_like(up_n), up_n)
                    down_n = torch.where(init, torch.zeros_like(down_n), down_n)
                    went_up, went_down = went_up & ~init, went_down & ~init
                    up_n = torch.where(live, torch.where(ok, up_n + 1, torch.zeros_like(up_n)), up_n)
                    down_n = torch.where(live, torch.where(ok, torch.zeros_like(down_n), down_n + 1), down_n)
                    raise_it = live & (up_n >= self.patience)
                    lower_it = live & ~raise_it & (down_n >= self.patience)
                    cost = torch.where(raise_it, cost * self.cost_multiplier, cost)
                    cost = torch.where(lower_it, cost / self.cost_multiplier**1.5, cost)
                    up_n = torch.where(raise_it, torch.zeros_like(up_n), up_n)
                    down_n = torch.where(lower_it, torch.zeros_like(down_n), down_n)
                    went_up, went_down = went_up | raise_it, went_down | lower_it
        finally:
            model.requires_grad_(True)
            model.train(was_training)
        return best_mask.cpu(), best_pattern.cpu(), success.cpu(), ran.cpu()

    def purify(self, engine: Engine, clean: torch.Tensor) -> dict[str, dict[str, float]]:
        saved = engine.state.setdefault("neural_cleanse", {})  # resumed runs do not redo it
        if "masks" not in saved:
            saved["masks"], saved["patterns"], saved["success"], saved["steps"] = self.reverse(engine, clean)
        masks, patterns, success = saved["masks"], saved["patterns"], saved["success"]
        norms = masks.flatten(1).sum(1)
        index = anomaly_indices(norms)
        flagged = [int(c) for c in torch.argsort(index, descending=True) if index[c] > self.anomaly_threshold]
        self.notes.update(mask_l1=norms.tolist(), anomaly_index=index.tolist(), flagged=flagged,
                          trigger_success=success.tolist(), reverse_steps=saved["steps"].tolist())
        self.tensors = {"nc_masks": masks.contiguous(), "nc_patterns": patterns.contiguous()}
        now = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        top = flagged[0] if flagged else int(torch.argmax(index))
        steps = {"reverse": {**now, "flagged_count": float(len(flagged)), "top_class": float(top),
                             "top_anomaly_index": float(index[top]), "top_mask_l1": float(norms[top]),
                             "median_mask_l1": float(norms.median())}}
        if self.unlearner is not None and flagged:
            steps["unlearning"] = self._unlearn(engine, clean, masks[top], patterns[top], top)
        return steps

    def _unlearn(self, engine: Engine, clean: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                 target: int) -> dict[str, float]:
        """Stamp the reversed trigger on ``stamp_count`` clean images labelled ``target`` and
        unlearn them, ``D_c`` being the rest of the clean subset (Table 11)."""
        g = torch.Generator().manual_seed(self.clean_seed + 11)
        perm = clean[torch.randperm(len(clean), generator=g).to(clean.device)]
        n = min(self.stamp_count, max(1, len(clean) // 2))
        stamped, rest = perm[:n].sort().values, perm[n:].sort().values
        images, labels = engine.data.images.clone(), engine.data.labels.clone()
        m, p = mask.to(engine.device), pattern.to(engine.device)
        x = to_float(images[stamped])
        images[stamped] = ((1 - m) * x + m * p).mul(255).round().clamp(0, 255).to(torch.uint8)
        labels[stamped] = target
        unlearner = UNLEARNERS.create(self.unlearner, "defense.unlearner")  # type: ignore[arg-type]
        ctx = UnlearnContext(stamped, batch_size=None, clean=rest, images=images, labels=labels)
        return {**unlearner.unlearn(engine, ctx), "stamped": float(n)}

"""ABL's unlearning: global gradient ascent (GGA, Li et al., NeurIPS 2021, Eq. 5) and the
authors' pure ascent on ``D_b``, with the checks that tell whether the backdoor was cut."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from abl.config import check
from abl.metrics import METRIC_KEYS, phase_metrics
from abl.engine import Engine, Objective
from abl.unlearning.base import UNLEARNERS, Unlearner, UnlearnContext

#: below this many held-out suspects the unlearning check is coarse, and the run says so
MIN_FIRM_HOLDOUT = 10


def _ascent_term(bad: torch.Tensor, ceiling: float | None) -> torch.Tensor:
    """Mean loss of isolated examples to ascend; with a ``ceiling``, examples whose loss
    already exceeds it stop contributing (their backdoor link is already cut)."""
    if ceiling is None:
        return bad.mean()
    return torch.where(bad.detach() < ceiling, bad, torch.zeros_like(bad)).mean()


def gga_objective(isolated_lookup: torch.Tensor, ceiling: float | None = None) -> Objective:
    """Joint GGA: ``mean over D_c of l - mean over D_b of l`` within each paired batch."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # masked sums instead of boolean indexing and len(): no host sync per step on a GPU
        iso = isolated_lookup[idx].to(losses.dtype)
        n_bad = iso.sum()
        n_clean = iso.numel() - n_bad
        clean = (losses * (1 - iso)).sum() / n_clean.clamp_min(1)
        bad = losses if ceiling is None else torch.where(losses.detach() < ceiling, losses, torch.zeros_like(losses))
        return clean - (bad * iso).sum() / n_bad.clamp_min(1)

    return objective


def ascent_objective(ceiling: float | None = None) -> Objective:
    """Pure gradient ascent on the isolated examples (the authors' unlearning)."""

    def objective(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -_ascent_term(losses, ceiling)

    return objective


def split_holdout(isolated: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unlearned, held out): a seeded ``share`` of ``isolated`` kept out of unlearning.
    Nothing is held out when either part would be empty."""
    isolated = isolated.sort().values  # the split depends on the set, not its order
    n_hold = int(round(share * len(isolated)))
    if n_hold < 1 or n_hold >= len(isolated):
        return isolated, isolated[:0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(isolated), generator=g).to(isolated.device)
    return isolated[perm[n_hold:]], isolated[perm[:n_hold]]


@UNLEARNERS.register("gga")
@dataclass
class GGA(Unlearner):
    """Global gradient ascent: minimise ``mean over D_c - mean over D_b`` of the loss in
    every batch (the ABL paper's Eq. 5). Defaults: ABL's ``default`` preset.

    Records ``iso_fit_before`` / ``iso_fit_after``: the model's accuracy on the unlearned
    examples' own training labels, and ``iso_heldout_fit_before`` / ``_after`` on the
    held-out suspects (``holdout``). None needs ground truth. The unlearned examples can be
    memorised (their fit reached 0% at full scale while ASR stayed at 75%), so when suspects
    are held out they decide ``unlearn_weak`` (fit above 0.5 after unlearning: the run
    warns that the link was not cut).

    Parameters:
        epochs: epochs of unlearning (20; the paper's 20, the authors' 4).
        lr: the unlearning learning rate (1e-3; the paper's 1e-4, the authors' 5e-4).
        epoch: what one epoch is: a pass over ``D_b`` (``isolated``, the authors': each
            ``D_b`` batch paired with as many ``D_c`` examples) or over ``D_c`` (``clean``:
            each ``D_c`` batch paired with as many ``D_b`` examples).
        bn: BatchNorm during unlearning: ``train`` (the authors'), ``fixed_stats`` (batch
            statistics, running statistics kept) or ``frozen`` (running statistics used).
        carry_momentum: keep the previous stage's optimizer (and its momentum).
        ceiling: an isolated example stops being ascended once its loss exceeds this
            (None or .inf: unbounded, as in the paper).
        holdout: fraction of ``D_b`` (seeded) kept out of unlearning as a check.
        select: ``last`` keeps the last epoch's model; ``heldout`` the epoch whose model
            fits the held-out suspects least, restored at the end.
        patience: with ``heldout``, stop this many epochs after the best one (0: never).
    """

    epochs: int = 20
    lr: float = 0.001
    epoch: Literal["isolated", "clean"] = "clean"
    bn: Literal["train", "fixed_stats", "frozen"] = "train"
    carry_momentum: bool = False
    ceiling: float | None = 4.0
    holdout: float = 0.2
    select: Literal["last", "heldout"] = "heldout"
    patience: int = 5

    def validate(self) -> None:
        check(self.epochs >= 0, "unlearner.epochs", "must be >= 0")
        check(self.lr > 0, "unlearner.lr", "must be > 0")
        check(self.ceiling is None or self.ceiling > 0, "unlearner.ceiling", "must be > 0 or null")
        check(0 <= self.holdout < 1, "unlearner.holdout", "must be in [0, 1)")
        check(self.select == "last" or self.holdout > 0, "unlearner.select", "'heldout' needs holdout > 0")
        check(self.patience >= 0, "unlearner.patience", "must be >= 0 (0: no early stop)")

    def total_epochs(self) -> int:
        return self.epochs

    def objective(self, lookup: torch.Tensor, ceiling: float | None) -> Objective:
        return gga_objective(lookup, ceiling)

    def unlearn(self, engine: Engine, ctx: UnlearnContext) -> dict[str, float]:
        t0 = time.perf_counter()
        bs = ctx.batch_size or engine.cfg.batch_size
        lookup = ctx.lookup(len(engine.data), engine.device)
        isolated = lookup.nonzero().squeeze(1)
        unlearned, held = split_holdout(isolated, float(self.holdout), engine.seed)
        if self.holdout and not len(held):
            warnings.warn(
                f"ABL: {len(isolated)} isolated examples are too few to hold "
                f"{self.holdout:.0%} out; unlearning all of them and keeping the last epoch",
                stacklevel=3,
            )
        elif 0 < len(held) < MIN_FIRM_HOLDOUT:
            warnings.warn(
                f"ABL: the held-out check of unlearning rests on {len(held)} suspect{'' if len(held) == 1 else 's'} only; with so few "
                "it can read 0% fitted while the backdoor still works (measured: 4 suspects, sticker ASR "
                "49%). Raise isolation_rate or unlearning_holdout for a firmer check.",
                stacklevel=3,
            )
        unlearn_lookup = torch.zeros_like(lookup)
        unlearn_lookup[unlearned] = True
        ceiling = self.ceiling
        if ceiling is not None and math.isinf(ceiling):
            ceiling = None
        cap = ceiling if ceiling is not None else 10.0

        data = (ctx.images, ctx.labels)  # the training set as the unlearner sees it

        def held_score() -> tuple[float, float]:
            correct, losses = engine.train_fit(held, *data)
            return float(correct.float().mean()), float(losses.clamp_max(cap).mean())

        # measured on the recovered model, and kept in the engine's state with the best epoch
        # so far: a run resumed mid-unlearning cannot measure them again
        saved = engine.state.setdefault("unlearning", {})
        if "fit_before" not in saved:
            saved["fit_before"] = engine.train_accuracy(unlearned, *data)
            saved["held_before"] = held_score()[0] if len(held) else None
        fit_before, held_before = saved["fit_before"], saved["held_before"]
        select = self.select == "heldout" and len(held) > 0
        best: dict = saved.setdefault("best", {"key": None, "epoch": 0, "state": None, "fit": None})

        def watch(e: int) -> bool:
            fit, loss = held_score()
            # the per-epoch curves: held-out suspects, and the unlearned ones for comparison
            engine.history[-1].update(heldout_fit=fit, heldout_loss=loss, unlearned_fit=engine.train_accuracy(unlearned, *data))
            if not select:
                return False
            key = [fit, -loss]
            if best["key"] is None or key < best["key"]:
                best.update(key=key, epoch=e, fit=fit, state={k: v.detach().clone() for k, v in engine.model.state_dict().items()})
            return bool(self.patience) and e - best["epoch"] >= int(self.patience)

        clean_index = ctx.clean_index(len(engine.data), engine.device)  # held-out suspects are in neither set
        common = dict(
            epochs=self.epochs,
            lr=self.lr,
            optimizer=ctx.recovery_opt if self.carry_momentum else None,
            batch_size=bs,
            nesterov=ctx.nesterov,
            freeze_bn={"train": False, "fixed_stats": "stats", "frozen": True}[self.bn],
            after_epoch=watch if len(held) else None,
            images=ctx.images,
            labels=ctx.labels,
        )
        n_before = len(engine.history)
        self._run(engine, unlearn_lookup, unlearned, clean_index, ceiling, bs, common)
        epochs_run = len(engine.history) - n_before
        if select and best["state"] is not None and best["epoch"] != epochs_run - 1:
            engine.model.load_state_dict(best["state"])
            final = {k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS}
        else:
            final = phase_metrics(engine) if "clean_acc" in engine.history[-1] else {
                k: float(v) for k, v in engine.evaluate(full=True).items() if k in METRIC_KEYS
            }
        fit_after = engine.train_accuracy(unlearned, *data)
        held_after = held_score()[0] if len(held) else None
        decisive = held_after if held_after is not None else fit_after
        if decisive > 0.5:
            which = "held-out suspects" if held_after is not None else "isolated examples"
            warnings.warn(
                f"ABL: unlearning did not cut the {which}' link to their labels: the model still fits "
                f"{decisive:.0%} of them (before unlearning: {held_before if held_after is not None else fit_before:.0%}); "
                "raise unlearning_epochs or unlearning_lr, or check the isolation evidence.",
                stacklevel=3,
            )
        out = {
            **final, "iso_fit_before": fit_before, "iso_fit_after": fit_after,
            "unlearn_weak": float(decisive > 0.5), "unlearn_epochs_run": float(epochs_run),
            "stage_s": time.perf_counter() - t0,
        }
        if held_after is not None:
            out.update(iso_heldout_fit_before=held_before, iso_heldout_fit_after=held_after, iso_heldout_count=float(len(held)))
        if select:
            out["unlearn_epoch_kept"] = float(best["epoch"] + 1)
        return out

    def _run(
        self, engine: Engine, unlearn_lookup: torch.Tensor, unlearned: torch.Tensor, clean_index: torch.Tensor,
        ceiling: float | None, bs: int, common: dict,
    ) -> None:
        over_clean = self.epoch == "clean"
        engine.run_phase(
            "unlearning",
            objective=gga_objective(unlearn_lookup, ceiling),
            index=clean_index if over_clean else unlearned,
            paired=unlearned if over_clean else clean_index,
            paired_batch_size=bs,
            **common,
        )


@UNLEARNERS.register("ascent")
@dataclass
class Ascent(GGA):
    """Pure gradient ascent on ``D_b`` (``-mean over D_b``; the ABL authors' code, which
    never visits ``D_c`` while unlearning). Defaults: the ``official`` preset.

    Parameters:
        epoch: always ``isolated`` (a pass over ``D_b``).
    """

    epochs: int = 4
    lr: float = 0.0005
    epoch: Literal["isolated", "clean"] = "isolated"
    carry_momentum: bool = True
    ceiling: float | None = None
    holdout: float = 0.0
    select: Literal["last", "heldout"] = "last"
    patience: int = 0

    def validate(self) -> None:
        super().validate()
        check(self.epoch == "isolated", "unlearner.epoch", "pure ascent never visits D_c: use 'isolated'")

    def _run(
        self, engine: Engine, unlearn_lookup: torch.Tensor, unlearned: torch.Tensor, clean_index: torch.Tensor,
        ceiling: float | None, bs: int, common: dict,
    ) -> None:
        engine.run_phase("unlearning", objective=ascent_objective(ceiling), index=unlearned, **common)

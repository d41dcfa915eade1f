"""ABL's unlearning: global gradient ascent (GGA, Li et al., NeurIPS 2021, Eq. 5) and the
authors' pure ascent on ``D_b``, with the checks that tell whether the backdoor was cut."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from abl.config import check
from abl.metrics import METRIC_KEYS, phase_metrics
from abl.engine import Engine, Objective
from abl.unlearning.base import UNLEARNERS, Unlearner, UnlearnContext

#: below this many held-out suspects the unlearning check is coarse, and the run says so
MIN_FIRM_HOLDOUT = 10

#: at most this many ``D_c`` examples (seeded) measure the clean fit after every
#: unlearning epoch: at 2,000 a fit near 90% has a standard error under 0.7 points (the
#: epochs share the sample, so their differences vary less), and one pass over them costs
#: a fraction of an unlearning epoch
CLEAN_SAMPLE = 2000


@dataclass(frozen=True)
class EpochFit:
    """What unlearning-epoch selection sees of one epoch's model; no ground truth.

    ``clean_fit``: accuracy on the ``D_c`` sample, labels as trained. ``held_fit`` /
    ``held_loss``: share of the held-out suspects fitted to their training labels, and their
    mean loss capped at the ceiling. ``unlearned_fit``: the same share for the unlearned
    suspects."""

    clean_fit: float
    held_fit: float
    held_loss: float
    unlearned_fit: float


def suspect_fit(record: EpochFit, n_held: int, n_unlearned: int) -> float:
    """The share of suspects an epoch's model still fits, as selection judges it: the
    held-out ones' when there are at least ``MIN_FIRM_HOLDOUT`` of them; else held-out and
    unlearned together. A few held-out suspects can all read unfitted while the backdoor
    works (4 suspects, sticker ASR 49%); the unlearned ones, though the ascent trains on
    them, keep such an epoch from winning on that reading while most of them still fit."""
    if n_held >= MIN_FIRM_HOLDOUT or n_unlearned == 0:
        return record.held_fit
    return (n_held * record.held_fit + n_unlearned * record.unlearned_fit) / (n_held + n_unlearned)


def select_epoch(
    records: Sequence[EpochFit], clean_before: float, tolerance: float, n_held: int, n_unlearned: int
) -> int:
    """Index of the unlearning epoch to keep (``records[i]``: epoch ``i``'s model).

    Eligible: an epoch whose clean fit is at least ``clean_before - tolerance`` (the
    recovered model's, less what unlearning may cost). Among the eligible, the one whose
    suspects are fitted least (:func:`suspect_fit`); ties go to the higher held-out loss,
    then to the higher clean fit, then to the earlier epoch. With none eligible, the epoch
    with the highest clean fit (ties: fewer suspects fitted, higher loss, earlier).

    Why the loss before the clean fit: a damaged model also scores a high suspect loss,
    which is what the gate is for; among undamaged models the loss still sees the backdoor
    come back while a few suspects all read unfitted, and the clean fit does not: GGA's
    descent over ``D_c`` raises it as it re-teaches the trigger from the poisons left there.
    On the digits (3 held-out suspects, BadNets 10%, lr 0.01) the tied epochs' clean fit
    peaked with ASR back at 42%, their held-out loss at ASR 0%.

    The recovered model (no unlearning) is not a candidate: its clean fit is the reference,
    so it would win whenever cutting the link costs anything, and keep the backdoor with
    only the held-out check's warning. Whether to unlearn at all is the isolation
    evidence's call, made before this stage.

    One total order, earliest first on ties: adding a record moves the choice to the new
    epoch or leaves it, so the choice on a prefix stands as epochs come in (``patience``
    counts from it).
    """
    if not records:
        raise ValueError("select_epoch needs at least one epoch's record")
    floor = clean_before - tolerance

    def key(i: int) -> tuple:
        r = records[i]
        fit = suspect_fit(r, n_held, n_unlearned)
        if r.clean_fit >= floor:
            return (0, fit, -r.held_loss, -r.clean_fit, i)
        return (1, -r.clean_fit, fit, -r.held_loss, i)

    return min(range(len(records)), key=key)


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


def clean_sample(
    clean_index: torch.Tensor, labels: torch.Tensor, isolated: torch.Tensor, seed: int, n: int = CLEAN_SAMPLE
) -> torch.Tensor:
    """A seeded sample of at most ``n`` of ``clean_index`` (``D_c``) to measure the clean
    fit on, without the label that most of ``isolated`` carry, if one does.

    ``D_c`` still holds the poisons isolation missed (90% of them at a 10% poisoning rate
    and a 1% isolated set). A one-target backdoor's poisons all carry its target label, and
    cutting the backdoor rightly stops the model fitting them: with that label in the
    sample, the clean fit would fall by the poisons' share of ``D_c`` exactly when
    unlearning works. An attack whose poisons carry many labels (all-to-all) still weighs
    in the sample."""
    index = clean_index
    if len(isolated):
        iso_labels = labels[isolated.to(labels.device)]
        top = torch.mode(iso_labels).values
        if 2 * int((iso_labels == top).sum()) > len(isolated):
            rest = index[labels[index.to(labels.device)].to(index.device) != top.to(index.device)]
            index = rest if len(rest) else index
    index = index.sort().values  # the sample depends on the set, not its order
    if len(index) > n:
        g = torch.Generator().manual_seed(seed)
        index = index[torch.randperm(len(index), generator=g)[:n].to(index.device)].sort().values
    return index


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
    warns that the link was not cut). ``clean_fit_before`` / ``_after`` (and ``clean_fit``
    per epoch): accuracy on a seeded sample of ``D_c`` (:func:`clean_sample`), the cost of
    unlearning to clean data, again without ground truth.

    ``select: heldout`` keeps the epoch :func:`select_epoch` picks: within
    ``clean_tolerance`` of the recovered model's clean fit, the one whose suspects fit
    least. Fewer than ``MIN_FIRM_HOLDOUT`` held-out suspects are pooled with the unlearned
    ones to judge (:func:`suspect_fit`), and the run warns that its check is coarse.

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
        select: ``last`` keeps the last epoch's model; ``heldout`` the epoch
            :func:`select_epoch` picks from the suspects' fit and the clean fit, restored
            at the end.
        patience: with ``heldout``, stop this many epochs after the best one (0: never).
        clean_tolerance: with ``heldout``, how far (a share of the ``D_c`` sample) an
            epoch's clean fit may fall below the recovered model's and the epoch still be
            kept (0.02: the 2 points of clean accuracy the default may cost, issue 25).
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
    clean_tolerance: float = 0.02

    def validate(self) -> None:
        check(self.epochs >= 0, "unlearner.epochs", "must be >= 0")
        check(self.lr > 0, "unlearner.lr", "must be > 0")
        check(self.ceiling is None or self.ceiling > 0, "unlearner.ceiling", "must be > 0 or null")
        check(0 <= self.holdout < 1, "unlearner.holdout", "must be in [0, 1)")
        check(self.select == "last" or self.holdout > 0, "unlearner.select", "'heldout' needs holdout > 0")
        check(self.patience >= 0, "unlearner.patience", "must be >= 0 (0: no early stop)")
        check(0 <= self.clean_tolerance < 1, "unlearner.clean_tolerance", "must be in [0, 1) (a share of D_c)")

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
        clean_index = ctx.clean_index(len(engine.data), engine.device)  # held-out suspects are in neither set
        clean_probe = clean_sample(clean_index, ctx.labels_of(engine), isolated, engine.seed)

        def score(index: torch.Tensor) -> tuple[float, float]:
            correct, losses = engine.train_fit(index, *data)
            return float(correct.float().mean()), float(losses.clamp_max(cap).mean())

        def clean_fit() -> float:
            return engine.train_accuracy(clean_probe, *data)

        # measured on the recovered model, and kept in the engine's state with the epochs'
        # records and the best epoch so far: a run resumed mid-unlearning cannot measure them again
        saved = engine.state.setdefault("unlearning", {})
        if "fit_before" not in saved:
            saved["fit_before"] = engine.train_accuracy(unlearned, *data)
            saved["held_before"] = score(held)[0] if len(held) else None
        if "clean_before" not in saved:  # apart: a checkpoint from before it was measured lacks it
            saved["clean_before"] = clean_fit()
        fit_before, held_before, clean_before = saved["fit_before"], saved["held_before"], saved["clean_before"]
        select = self.select == "heldout" and len(held) > 0
        records: list = saved.setdefault("records", [])  # EpochFit's fields, one list per epoch
        best: dict = saved.setdefault("best", {"epoch": 0, "state": None})
        tolerance = float(self.clean_tolerance)

        def watch(e: int) -> bool:
            fit, loss = score(held)
            unlearned_fit, unlearned_loss = score(unlearned)
            clean = clean_fit()
            # the per-epoch curves: held-out suspects, the unlearned ones for comparison, D_c
            engine.history[-1].update(
                heldout_fit=fit, heldout_loss=loss, unlearned_fit=unlearned_fit, unlearned_loss=unlearned_loss,
                clean_fit=clean,
            )
            if not select:
                return False
            del records[e:]  # a resumed epoch replaces its record
            records.append([clean, fit, loss, unlearned_fit])
            kept = select_epoch([EpochFit(*r) for r in records], clean_before, tolerance, len(held), len(unlearned))
            if kept == e:
                best.update(epoch=e, state={k: v.detach().clone() for k, v in engine.model.state_dict().items()})
            return bool(self.patience) and e - best["epoch"] >= int(self.patience)

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
        held_after = score(held)[0] if len(held) else None
        clean_after = clean_fit()
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
            "clean_fit_before": clean_before, "clean_fit_after": clean_after,
            "stage_s": time.perf_counter() - t0,
        }
        if held_after is not None:
            out.update(iso_heldout_fit_before=held_before, iso_heldout_fit_after=held_after, iso_heldout_count=float(len(held)))
        if select:
            out["unlearn_epoch_kept"] = float(best["epoch"] + 1)
            kept_clean = records[best["epoch"]][0] if records else clean_before
            if kept_clean < clean_before - tolerance:
                warnings.warn(
                    f"ABL: every unlearning epoch lowered the clean fit (accuracy on D_c's training labels) by more "
                    f"than clean_tolerance ({tolerance:g}) from the recovered model's {clean_before:.1%}; kept epoch "
                    f"{best['epoch'] + 1}, the least damaged ({kept_clean:.1%}). Lower unlearning_lr, or check the "
                    "isolation evidence.",
                    stacklevel=3,
                )
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

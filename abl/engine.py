"""The one training loop every defense and baseline uses (the airbench/nanoGPT shape).

A defense is a sequence of :meth:`Engine.run_phase` calls that differ only in their
objective, the subset of examples they visit, augmentation and learning rates. Every
phase records the loss of every example it trains on, at every epoch, straight from the
training batches (no extra pass), so the report can show how fast poisoned and clean
examples are learned (the ABL paper's Figure 6).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from abl.checkpoint import load_optimizer_state, optimizer_state
from abl.config import check
from abl.data.loader import AugmentConfig, AugmentDraw, TensorLoader, to_float
from abl.data.types import ImageSplit, PoisonedSet, TriggeredTestSet
from abl.errors import ConfigError, DivergenceError, StoreError
from abl.metrics import evaluate

#: objective(per_example_losses, indices) -> scalar loss to minimise
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


def mean_loss(losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy training."""
    return losses.mean()


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Per-example label-smoothed cross-entropy, ``eps`` one value or one per example:
    ``(1 - eps) * CE(y) + eps * mean_k CE(k)`` (Szegedy et al., CVPR 2016)."""
    return _smoothed_and_plain(logits, y, eps)[0]


def _smoothed_and_plain(
    logits: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed, plain) per-example cross-entropy from one log-softmax; the plain
    one is exactly ``F.cross_entropy(logits, y, reduction="none")`` (a negated gather)."""
    logp = torch.log_softmax(logits, 1)
    picked = logp.gather(1, y[:, None]).squeeze(1)
    return -(1 - eps) * picked - eps * logp.mean(1), -picked


@dataclass
class TrainConfig:
    """Settings of the training engine shared by every phase.

    Parameters:
        batch_size: training batch size (128 in the ABL paper).
        eval_batch_size: batch size for ranking and evaluation (no gradients, so large).
        momentum, weight_decay, nesterov: SGD settings (0.9, 1e-4, off in the paper).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: bf16 autocast on CUDA (ignored elsewhere).
        channels_last: channels-last memory format on CUDA (ignored elsewhere).
        compile: wrap the model in ``torch.compile`` for training steps.
        eval_every: epochs between cheap evaluations on ``eval_subset`` test images
            (0: only the full evaluation at the end of each phase).
        eval_subset: test images used by the cheap per-epoch evaluation (0: all).
        progress: show a progress bar.
        threads: CPU threads for torch (0: torch's default).
        checkpoint: write a checkpoint into the run folder so that ``abl resume`` can
            continue the run after a crash or a kill (removed when the run finishes).
        checkpoint_every_s: at most one checkpoint per this many seconds, always one at the
            end of each phase (0: after every epoch). A run loses at most this much work
            plus one epoch.
        fast_step: ``on`` draws each epoch's batch order and augmentation at its start (in
            the same random order, so results are identical) and runs every full batch
            through one fixed-shape step function, captured once and replayed as a CUDA
            graph on CUDA (re-captured when the learning rate, BatchNorm mode or objective
            changes; the last partial batch runs eagerly); elsewhere the same function runs
            eagerly. ``off``: the plain loop over the loader. ``auto``: on for CUDA.
    """

    batch_size: int = 128
    eval_batch_size: int = 1024
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_every: int = 1
    eval_subset: int = 2000
    progress: bool = True
    threads: int = 0
    checkpoint: bool = True
    checkpoint_every_s: float = 60.0
    fast_step: str = "auto"

    def validate(self) -> None:
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        check(0.0 <= self.momentum < 1.0, "train.momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0.0, "train.weight_decay", "must be >= 0")
        check(not self.nesterov or self.momentum > 0, "train.nesterov", "needs momentum > 0")
        check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        check(self.eval_subset >= 0, "train.eval_subset", "must be >= 0")
        check(self.threads >= 0, "train.threads", "must be >= 0")
        check(self.checkpoint_every_s >= 0, "train.checkpoint_every_s", "must be >= 0 (0: after every epoch)")
        check(self.fast_step in ("auto", "on", "off"), "train.fast_step", "must be auto, on or off")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"'train.device' {self.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("'train.device' asks for CUDA but no CUDA device is available; use auto or cpu")
        return dev


def step_lr(base_lr: float, epoch: int, milestones: tuple[int, ...] | list[int], factor: float) -> float:
    """Learning rate at ``epoch`` (0-based, within a phase) of a step schedule."""
    return base_lr * factor ** sum(1 for m in milestones if epoch >= m)


class Engine:
    """Trains one model on one poisoned set; keeps the per-example loss record and history."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: PoisonedSet,
        test: ImageSplit,
        triggered: TriggeredTestSet | None,
        cfg: TrainConfig,
        *,
        seed: int = 0,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = data.images.device
        cuda = self.device.type == "cuda"
        if cuda:  # fixed shapes every step: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.autocast_dtype = torch.bfloat16 if (cuda and cfg.amp) else None
        self.channels_last = cuda and cfg.channels_last
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        self.data = data
        self.test = ImageSplit(test.images.to(self.device), test.labels.to(self.device))
        self.triggered = triggered
        if triggered is not None:
            self.triggered = TriggeredTestSet(*(t.to(self.device) for t in (triggered.images, triggered.true_labels, triggered.attack_labels)))
        self.seed = seed
        self.on_epoch = on_epoch
        self.epoch = 0  # global epoch counter across phases
        self.history: list[dict] = []
        # the (epochs, N) loss record, NaN = not trained: rows [:_n_loss] of a CPU buffer
        # grown a phase at a time, so an epoch or a checkpoint never copies the whole record
        self._loss_store = torch.empty(0, len(data))
        self._n_loss = 0
        self._phase_count = 0
        #: what a defense must carry across an interruption that the history and the loss
        #: record do not hold (e.g. ABL's ranking passes, its best unlearning epoch); saved
        #: with every checkpoint, so values must be tensors, numbers, strings, lists or dicts
        self.state: dict[str, Any] = {}
        self._phases: list[str] = []  # names of the phases started, in order
        #: the whole run's plan, for progress across phases (see :meth:`plan`)
        self._plan_epochs: int | None = None
        self._plan_phases: int | None = None
        self._trained_s = 0.0  # seconds spent in epochs this process trained
        self._trained_epochs = 0
        self._phase_ends: list[int] = []  # len(history) at the end of each finished phase
        self._write_checkpoint: Callable[[dict], None] | None = None
        self._last_checkpoint = time.monotonic()
        self._resume: dict | None = None
        #: where stages shared between runs are cached (``abl.stages``); None: not cached
        self.stage_dir: Path | None = None
        #: the augmentation the training images keep their classes under (set by the
        #: experiment from its dataset, :func:`abl.data.loader.data_augment`); built
        #: directly, the paper's crop 4 + flip + Cutout 9 (CIFAR-10's)
        self.data_augment: AugmentConfig | None = AugmentConfig()
        #: builds a freshly initialised model of the run's architecture (set by the
        #: experiment; unlearners that retrain from scratch use it)
        self.model_factory: Callable[[], torch.nn.Module] | None = None
        gen = torch.Generator().manual_seed(seed)
        self._eval_index = self._subset_index(len(self.test), gen)
        self._eval_trig_index = self._subset_index(len(self.triggered), gen) if self.triggered is not None else None
        self._eval_sets: tuple[ImageSplit, TriggeredTestSet | None] | None = None  # built at first use
        self._graphs: dict[tuple, _CapturedStep] = {}  # the one captured training step (CUDA)
        self._warm: set[tuple] = set()  # graph keys that had their eager warm-up step

    def _subset_index(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        k = self.cfg.eval_subset
        if k == 0 or k >= n:
            return None
        return torch.randperm(n, generator=gen)[:k].to(self.device)

    # -- progress --------------------------------------------------------------------
    def plan(self, epochs: int | None, phases: int | None = None) -> None:
        """Tell the progress display how many epochs (and phases) the whole run trains,
        so that it shows "phase i of n" and an ETA for the run, not only for the phase."""
        self._plan_epochs = epochs if epochs and epochs > 0 else None
        self._plan_phases = phases if phases and phases > 0 else None

    def plan_for(self, defense: Any) -> None:
        """:meth:`plan` from a defense: its ``total_epochs()``, and its phases where its
        parts say (an ABL-shaped defense: detector training, recovery, unlearning)."""
        try:
            epochs = int(defense.total_epochs())
        except (NotImplementedError, AttributeError, TypeError, ValueError):
            return
        phases = None
        if hasattr(defense, "detector_part") and hasattr(defense, "unlearner_part"):
            det = defense.detector_part()
            stages = [getattr(defense.backdoor, "epochs", 0) if det.uses_backdoored else 0, det.training_epochs(),
                      int(getattr(defense, "recovery_epochs", 0) or 0), defense.unlearner_part().total_epochs()]
            phases = sum(1 for e in stages if e)
        self.plan(epochs, phases)

    def _phase_label(self, ordinal: int, phase: str) -> str:
        n = self._plan_phases
        return f"phase {ordinal} of {max(n, ordinal)}: {phase}" if n else f"phase {ordinal}: {phase}"

    def run_eta(self) -> float | None:
        """Seconds left in the whole run at the mean epoch time so far (None: no plan or
        no epoch timed yet)."""
        if self._plan_epochs is None or not self._trained_epochs:
            return None
        left = max(0, self._plan_epochs - len(self.history))
        return left * self._trained_s / self._trained_epochs

    def _run_progress(self) -> str:
        """``run 21/50 epochs, ETA 1:05`` for the progress bar (empty without a plan)."""
        if self._plan_epochs is None:
            return ""
        eta = self.run_eta()
        done = f"run {min(len(self.history), self._plan_epochs)}/{self._plan_epochs} epochs"
        return done + (f", ETA {fmt_duration(eta)}" if eta is not None else "")

    # -- checkpoints -----------------------------------------------------------------
    def enable_checkpoints(self, write: Callable[[dict], None]) -> None:
        """Call ``write(state)`` after an epoch when a checkpoint is due (see
        ``TrainConfig.checkpoint_every_s``) and at the end of every phase."""
        self._write_checkpoint = write

    def resume_from(self, ck: dict) -> None:
        """Continue from checkpoint ``ck`` (what ``write`` was given, read back).

        The defense then runs from its start as usual: every phase the checkpoint had
        finished is skipped (its history and loss record restored, nothing trained), and
        the phase it stopped in continues after its last complete epoch with the model,
        optimizer, loader and RNG states as they were.
        """
        if ck.get("n_examples") != len(self.data):
            raise StoreError(
                f"the checkpoint was written for {ck.get('n_examples')} training examples, this run has "
                f"{len(self.data)}: the data changed since the run started; start it again with `abl run`"
            )
        self._resume = ck
        self._phases = list(ck["phases"])
        self.state = _to_device(ck["defense_state"], self.device)

    def _restore_records(self, ck: dict, n: int) -> None:
        self.history = [dict(r) for r in ck["history"][:n]]
        self._set_losses(ck["example_losses"][:n])
        self.epoch = n

    @property
    def example_losses(self) -> list[torch.Tensor]:
        """The loss record as one (N,) CPU tensor per epoch (views of :meth:`loss_matrix`)."""
        return list(self.loss_matrix().unbind(0))

    @example_losses.setter
    def example_losses(self, rows: list[torch.Tensor]) -> None:
        self._set_losses(torch.stack(rows) if rows else torch.empty(0, len(self.data)))

    def _set_losses(self, matrix: torch.Tensor) -> None:
        self._loss_store = matrix.detach().to("cpu", torch.float32).clone()
        self._n_loss = len(matrix)

    def _reserve_losses(self, rows: int) -> None:
        """Room for ``rows`` more epochs of the loss record (one copy per phase at most)."""
        if self._n_loss + rows > len(self._loss_store):
            grown = torch.full((self._n_loss + rows, len(self.data)), float("nan"))
            grown[: self._n_loss] = self._loss_store[: self._n_loss]
            self._loss_store = grown

    def _catch_up(self, ck: dict, opt: torch.optim.Optimizer, loader: TensorLoader | None) -> None:
        """Put the model, optimizer, loader and RNGs where the checkpoint left them."""
        self.model.load_state_dict(ck["model"])
        load_optimizer_state(opt, ck["optimizer"])
        if loader is not None:
            loader.load_state_dict(ck["loader"])
        torch.set_rng_state(ck["rng"]["cpu"].cpu())
        if self.device.type == "cuda" and ck["rng"].get("cuda"):
            torch.cuda.set_rng_state_all([t.cpu() for t in ck["rng"]["cuda"]])
        self._resume = None

    def _checkpoint_state(
        self, ordinal: int, e: int, done: bool, opt: torch.optim.Optimizer, loader: TensorLoader
    ) -> dict:
        return {
            "n_examples": len(self.data),
            "phases": list(self._phases),
            "phase_ordinal": ordinal,
            "phase_epoch": e,
            "phase_done": done,
            "phase_ends": self._phase_ends + ([len(self.history)] if done else []),
            "history": self.history,
            "example_losses": self.loss_matrix(),
            "model": self.model.state_dict(),
            "optimizer": optimizer_state(opt),
            "loader": loader.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            },
            "defense_state": self.state,
        }

    def _resume_phase(self, ordinal: int, phase: str, opt: torch.optim.Optimizer, loader: TensorLoader) -> int | None:
        """While resuming: the epoch to start phase ``ordinal`` at, or None if it had
        finished before the interruption (then nothing is trained)."""
        ck = self._resume
        assert ck is not None
        started = ck["phases"]
        if ordinal > len(started) or started[ordinal - 1] != phase:
            raise StoreError(
                f"the checkpoint does not match this run: its phase {ordinal} is "
                f"{started[ordinal - 1] if ordinal <= len(started) else 'missing'!r}, the defense runs {phase!r}; "
                "the code or config changed since it was written: start the run again with `abl run`"
            )
        last = ck["phase_ordinal"]
        if ordinal < last or (ordinal == last and ck["phase_done"]):
            self._restore_records(ck, ck["phase_ends"][ordinal - 1])
            self._phase_ends = list(ck["phase_ends"][:ordinal])
            if ordinal == last:  # the optimizer may be carried into the next phase
                self._catch_up(ck, opt, None)
            return None
        self._restore_records(ck, len(ck["history"]))
        self._phase_ends = list(ck["phase_ends"])
        self._catch_up(ck, opt, loader)
        return int(ck["phase_epoch"]) + 1

    def skip_phase(self, phase: str) -> None:
        """Count ``phase`` as run without training it (its result came from a cache), so the
        phases after it get the same data order as in a run that trained it."""
        self._phase_count += 1
        if len(self._phases) < self._phase_count:
            self._phases.append(phase)
        if self._resume is None:
            self._phase_ends.append(len(self.history))

    def adopt_phases(self, phases: list[str], history: list[dict], example_losses: torch.Tensor) -> None:
        """Take phases trained elsewhere (a cached stage) as if this run had trained them:
        their history and loss record become this run's, and the phase count moves on, so
        the phases after them get the same data order as in a run that trained them."""
        ordinal = self._phase_count
        for name in phases:
            ordinal += 1
            if len(self._phases) < ordinal:
                self._phases.append(name)
        self._phase_count = ordinal
        if self._resume is not None and self._resume["phase_ordinal"] > ordinal:
            return  # resuming a later phase: its checkpoint holds these records already
        self.history = [dict(r) for r in history]
        self._set_losses(example_losses if len(history) else torch.empty(0, len(self.data)))
        self.epoch = len(history)
        if self.on_epoch is not None:  # the run's own log shows them like trained epochs
            for record in self.history:
                self.on_epoch(record)
        ends, n = [], 0
        for name in phases:  # each phase's records follow the previous phase's
            while n < len(history) and history[n]["phase"] == name:
                n += 1
            ends.append(n)
        self._phase_ends = ends

    # -- building blocks -------------------------------------------------------------
    def replace_model(self, model: torch.nn.Module) -> None:
        """Train and evaluate ``model`` from now on (e.g. an unlearner's pretrained network)."""
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model = torch.compile(self.model) if self.cfg.compile else self.model

    def optimizer(self, lr: float, nesterov: bool | None = None) -> torch.optim.SGD:
        """SGD with the engine's momentum and weight decay; ``nesterov`` overrides the
        engine's setting (a defense preset may fix it, e.g. the ABL authors' code)."""
        c = self.cfg
        nesterov = c.nesterov if nesterov is None else nesterov
        return torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=nesterov
        )

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, cache: bool = True) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None, cache_enabled=cache,
        ):
            return model(x)

    @torch.no_grad()
    def per_example_loss(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of every example (or of ``index``) in eval mode, no augmentation,
        in large batches: the ranking step of ABL. Returns a float32 tensor on the device."""
        self.model.eval()
        idx_all = index if index is not None else torch.arange(len(self.data), device=self.device)
        out = torch.empty(len(idx_all), device=self.device, dtype=torch.float32)
        bs = self.cfg.eval_batch_size
        for s in range(0, len(idx_all), bs):
            idx = idx_all[s : s + bs]
            logits = self._forward(self.model, to_float(self.data.images[idx]))
            out[s : s + bs] = F.cross_entropy(logits.float(), self.data.labels[idx], reduction="none")
        self.model.train()
        return out

    @torch.no_grad()
    def predict(self, index: torch.Tensor) -> torch.Tensor:
        """Eval-mode predicted classes of training examples ``index`` (on the device)."""
        was_training = self.model.training
        self.model.eval()
        out = []
        bs = self.cfg.eval_batch_size
        for s in range(0, len(index), bs):
            out.append(self._forward(self.model, to_float(self.data.images[index[s : s + bs]])).argmax(1))
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def train_accuracy(
        self, index: torch.Tensor, images: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> float:
        """Eval-mode accuracy on training examples ``index`` against their (possibly
        poisoned) training labels: how well the model still fits them."""
        correct, _ = self.train_fit(index, images, labels)
        return float(correct.float().mean()) if len(index) else 0.0

    @torch.no_grad()
    def train_fit(
        self, index: torch.Tensor, images: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (correct, loss) per training example of ``index``, against the
        examples' own (possibly poisoned) training labels; ``images`` / ``labels`` replace
        the training set's (a modified copy of the same length)."""
        images = self.data.images if images is None else images
        labels = self.data.labels if labels is None else labels
        was_training = self.model.training
        self.model.eval()
        correct, losses = [], []
        bs = self.cfg.eval_batch_size
        for s in range(0, len(index), bs):
            idx = index[s : s + bs]
            logits = self._forward(self.model, to_float(images[idx])).float()
            correct.append(logits.argmax(1) == labels[idx])
            losses.append(F.cross_entropy(logits, labels[idx], reduction="none"))
        self.model.train(was_training)
        if not correct:
            return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
        return torch.cat(correct).cpu(), torch.cat(losses).cpu()

    def evaluate(self, full: bool = True) -> dict[str, float]:
        """CA/ASR/RA on the whole test sets, or on the fixed per-epoch subsets."""
        test, trig = self.test, self.triggered
        if not full:
            if self._eval_sets is None:  # the subsets are fixed: gather them once
                if self._eval_index is not None:
                    test = test.subset(self._eval_index)
                if trig is not None and self._eval_trig_index is not None:
                    i = self._eval_trig_index
                    trig = TriggeredTestSet(trig.images[i], trig.true_labels[i], trig.attack_labels[i])
                self._eval_sets = (test, trig)
            test, trig = self._eval_sets
        return evaluate(
            self.model,
            test,
            trig,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            channels_last=self.channels_last,
        )

    # -- the loop ------------------------------------------------------------------
    def run_phase(
        self,
        phase: str,
        *,
        epochs: int,
        lr: float,
        objective: Objective = mean_loss,
        optimizer: torch.optim.Optimizer | None = None,
        milestones: tuple[int, ...] | list[int] = (),
        lr_factor: float = 0.1,
        index: torch.Tensor | None = None,
        augment: AugmentConfig | None = None,
        shuffle: bool = True,
        paired: torch.Tensor | None = None,
        paired_batch_size: int = 0,
        batch_size: int | None = None,
        after_epoch: Callable[[int], bool | None] | None = None,
        nesterov: bool | None = None,
        freeze_bn: bool | str = False,
        smoothing: float | torch.Tensor = 0.0,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.optim.Optimizer:
        """Train ``epochs`` epochs minimising ``objective`` over ``index`` (default: all).

        ``after_epoch(e)`` runs after each epoch's record (e.g. a ranking pass); when it
        returns True the phase stops there (early stopping).
        ``freeze_bn``: ``True`` keeps BatchNorm layers in eval mode (running statistics
        used, not updated); ``"stats"`` normalises with batch statistics as in training but
        leaves the running statistics untouched, so batches made mostly of isolated examples
        (unlearning) do not shift what the model uses at test time.
        ``smoothing``: label smoothing of the training loss the objective sees, one value or
        one per training example (``(N,)``, on the device); the loss record keeps the plain
        cross-entropy, so rankings compare the model's confidence in the label.
        ``images`` / ``labels``: train on a modified copy of the training set (same length
        and order; e.g. an unlearner that relabels or perturbs the isolated examples).
        ``extra_loss(x)``: a term added to the objective, called with the (augmented)
        batch right after the model's forward pass on it (e.g. NAD's attention loss, which
        reads the activations that pass left in forward hooks).
        Returns the optimizer so that a following phase can carry its momentum over.
        Raises :class:`DivergenceError` as soon as an epoch's loss is not finite.
        """
        opt = optimizer if optimizer is not None else self.optimizer(lr, nesterov)
        self._phase_count += 1
        ordinal = self._phase_count
        if len(self._phases) < ordinal:
            self._phases.append(phase)
        loader = TensorLoader(
            self.data.images if images is None else images,
            self.data.labels if labels is None else labels,
            batch_size or self.cfg.batch_size,
            index=index,
            shuffle=shuffle,
            augment=augment,
            seed=self.seed * 1000 + self._phase_count,
            paired=paired,
            paired_batch_size=paired_batch_size,
        )
        start = 0
        if self._resume is not None:
            resumed = self._resume_phase(ordinal, phase, opt, loader)
            if resumed is None:
                return opt
            start = resumed
        n = len(self.data)
        spec = _StepSpec(objective, smoothing, extra_loss)
        fast = self.cfg.fast_step == "on" or (self.cfg.fast_step == "auto" and self.device.type == "cuda")
        self._reserve_losses(epochs - start)
        # fixed buffers for the whole phase, so a captured step keeps writing to them
        seen = torch.empty(n, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        label = self._phase_label(ordinal, phase)
        if self.cfg.progress:
            where = self._run_progress()
            log.info("%s, %d epoch%s%s", label, epochs, "" if epochs == 1 else "s", f" ({where})" if where else "")
        bar = progress_bar(range(start, epochs), label, self.cfg.progress)
        self._train_mode(freeze_bn)
        for e in bar:
            current_lr = step_lr(lr, e, milestones, lr_factor)
            for group in opt.param_groups:
                group["lr"] = current_lr
            t0 = time.perf_counter()
            seen.fill_(float("nan"))
            loss_sum.zero_()
            if fast:
                steps = self._planned_epoch(loader, opt, spec, seen, loss_sum, (current_lr, str(freeze_bn)))
            else:
                steps = 0
                for x, y, idx in loader:
                    self._step(opt, x, y, idx, spec, seen, loss_sum)
                    steps += 1
            train_loss = float(loss_sum) / max(steps, 1)
            if not math.isfinite(train_loss):
                raise DivergenceError(
                    f"phase '{phase}' diverged at epoch {e + 1}: the training loss is {train_loss}; "
                    f"lower its learning rate (was {current_lr:g}) or its number of epochs"
                )
            record = self._record(phase, e, current_lr, train_loss, time.perf_counter() - t0, seen, epochs)
            self._trained_s += time.perf_counter() - t0
            self._trained_epochs += 1
            stop = bool(after_epoch(e)) if after_epoch is not None else False
            if self.on_epoch is not None:  # after the hook, which may add to the record
                self.on_epoch(record)
            self._train_mode(freeze_bn)  # evaluation and ranking passes switch to eval mode
            postfix = {k: f"{v:.3f}" for k, v in record.items() if k in ("train_loss", "clean_acc", "asr")}
            if self._plan_epochs is not None:
                postfix["run"] = self._run_progress().removeprefix("run ")
            bar.set_postfix(postfix)
            done = stop or e == epochs - 1
            due = time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_every_s
            if self._write_checkpoint is not None and (done or due):
                self._write_checkpoint(self._checkpoint_state(ordinal, e, done, opt, loader))
                self._last_checkpoint = time.monotonic()
            if stop:
                break
        self._phase_ends.append(len(self.history))
        self._train_mode(False)
        return opt

    def _step(
        self, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
        spec: _StepSpec, seen: torch.Tensor, loss_sum: torch.Tensor, cache: bool = True,
    ) -> None:
        """One training step on a batch: forward, per-example loss, objective, backward,
        optimizer, loss record. Nothing in it waits for the device (no host sync)."""
        logits = self._forward(self.train_model, x, cache).float()
        if spec.smoothed:
            eps = spec.smoothing[idx] if isinstance(spec.smoothing, torch.Tensor) else spec.smoothing
            smoothed, losses = _smoothed_and_plain(logits, y, eps)
            loss = spec.objective(smoothed, idx)
        else:
            losses = F.cross_entropy(logits, y, reduction="none")
            loss = spec.objective(losses, idx)
        if spec.extra_loss is not None:
            loss = loss + spec.extra_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen[idx] = losses.detach()
        loss_sum += loss.detach()

    def _planned_epoch(
        self, loader: TensorLoader, opt: torch.optim.Optimizer, spec: _StepSpec,
        seen: torch.Tensor, loss_sum: torch.Tensor, mode: tuple,
    ) -> int:
        """One epoch from a plan drawn at its start (:meth:`TensorLoader.plan`, same random
        order as iterating the loader), each batch through one step function of its
        gather, augmentation and :meth:`_step`. On CUDA, full batches replay a CUDA graph
        of that function (captured after two eager warm-up steps, again whenever ``mode``
        (lr, BatchNorm mode), the objective or any tensor it reads moves); the partial last
        batch and steps with an ``extra_loss`` (hooks) run eagerly. Returns the step count."""
        plan = loader.plan()
        graphs = self._graphable(spec)
        full = len(plan[0][0]) if plan else 0

        def step(idx: torch.Tensor, draw: AugmentDraw | None, cache: bool = True) -> None:
            self._step(opt, loader.batch(idx, draw), loader.labels[idx], idx, spec, seen, loss_sum, cache)

        for idx, draw in plan:
            if not graphs or len(idx) != full:
                step(idx, draw)
                continue
            key = self._graph_key(opt, loader, spec, seen, loss_sum, mode, full)
            graph = self._graphs.get(key)
            if graph is not None:
                graph(idx, draw)
            elif key not in self._warm:
                self._warm.add(key)
                self._warm_up(lambda: step(idx, draw, cache=False))
            else:
                self._graphs = {key: _CapturedStep(lambda i, d: step(i, d, cache=False), idx, draw)}
                self._graphs[key](idx, draw)
        return len(plan)

    def _graphable(self, spec: _StepSpec) -> bool:
        """Whether full batches replay a CUDA graph (NAD's hooks and torch.compile: eager)."""
        return self.device.type == "cuda" and spec.extra_loss is None and not self.cfg.compile

    def _warm_up(self, run: Callable[[], None]) -> None:
        """One real, eager step on a side stream, as CUDA graph capture wants its warm-up."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _graph_key(self, opt, loader, spec, seen, loss_sum, mode, full) -> tuple:
        """What a captured step has frozen: the lr and BatchNorm mode, the objective, the
        batch size and the addresses of every tensor it reads or writes."""
        tensors = [*self.model.parameters(), *self.model.buffers(), loader.images, loader.labels, seen, loss_sum]
        tensors += [b for p in self.model.parameters() if (b := opt.state.get(p, {}).get("momentum_buffer")) is not None]
        if isinstance(spec.smoothing, torch.Tensor):
            tensors.append(spec.smoothing)
        groups = tuple((g["lr"], g["momentum"], g["weight_decay"], g["nesterov"], g.get("dampening", 0)) for g in opt.param_groups)
        training = tuple(m.training for m in self.model.modules())
        return (mode, groups, training, id(spec.objective), full, tuple(t.data_ptr() for t in tensors))

    def _train_mode(self, freeze_bn: bool | str) -> None:
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if freeze_bn == "stats":
                    # momentum 0: running = running; remembered to restore it afterwards
                    if not hasattr(m, "_abl_momentum"):
                        m._abl_momentum = m.momentum  # type: ignore[attr-defined]
                    m.momentum = 0.0
                else:
                    if hasattr(m, "_abl_momentum"):
                        m.momentum = m._abl_momentum  # type: ignore[attr-defined]
                        del m._abl_momentum
                    if freeze_bn:
                        m.eval()

    def _record(self, phase: str, e: int, lr: float, train_loss: float, seconds: float, seen: torch.Tensor, epochs: int) -> dict:
        self._reserve_losses(1)
        seen_cpu = self._loss_store[self._n_loss]
        seen_cpu.copy_(seen)
        self._n_loss += 1
        mask = self.data.poison_mask.cpu()
        record: dict = {"phase": phase, "epoch": self.epoch, "phase_epoch": e, "lr": lr, "train_loss": train_loss, "time_s": seconds}
        for name, sel in (("poison_loss", mask), ("clean_loss", ~mask)):
            vals = seen_cpu[sel]
            vals = vals[~vals.isnan()]
            if len(vals):
                record[name] = float(vals.mean())
        last = e == epochs - 1
        every = self.cfg.eval_every
        if last or (every and (e + 1) % every == 0):
            record.update(self.evaluate(full=last))
        self.epoch += 1
        self.history.append(record)
        return record

    def loss_matrix(self) -> torch.Tensor:
        """The (epochs, N) per-example training-loss record (NaN where not trained)."""
        return self._loss_store[: self._n_loss]


@dataclass
class _StepSpec:
    """What a phase's training step computes besides the cross-entropy."""

    objective: Objective
    smoothing: float | torch.Tensor
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None

    @property
    def smoothed(self) -> bool:
        return isinstance(self.smoothing, torch.Tensor) or float(self.smoothing) > 0


class _CapturedStep:
    """A training step recorded once as a CUDA graph and replayed on new batches: the
    batch's index and augmentation draw are copied into the graph's own input tensors.
    Capture needs the step's lazily created state (momentum buffers, cuDNN plans) to
    exist already, hence the caller's eager warm-up steps."""

    def __init__(self, fn: Callable[[torch.Tensor, AugmentDraw | None], None], idx: torch.Tensor, draw: AugmentDraw | None) -> None:
        self.idx = idx.clone()
        self.draw = None if draw is None else AugmentDraw(*(None if t is None else t.clone() for t in draw.tensors()))
        self.graph = self._capture(fn)

    def _capture(self, fn: Callable[[torch.Tensor, AugmentDraw | None], None]) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(self.idx, self.draw)
        return graph

    def __call__(self, idx: torch.Tensor, draw: AugmentDraw | None) -> None:
        self.idx.copy_(idx)
        if self.draw is not None and draw is not None:
            for mine, new in zip(self.draw.tensors(), draw.tensors()):
                if mine is not None and new is not None:
                    mine.copy_(new)
        self.graph.replay()


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def fmt_duration(seconds: float) -> str:
    """``42 s``, ``3:05`` (minutes:seconds) or ``1:02:05`` (hours:minutes:seconds)."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_bar(it: range, desc: str, enabled: bool | None):
    """An epoch progress bar; ``enabled=None`` shows it only on an interactive terminal."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=None if enabled is None else not enabled, leave=False, dynamic_ncols=True)

"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020): generators that give every image its own trigger.

A pattern generator ``G`` and a mask generator ``M`` (both small encoder-decoders) map
an image ``x`` to a pattern ``G(x)`` in [0, 1] and a near-binary mask ``m(x)``; the
triggered image is ``x + (G(x) - x) * m(x)``. The generators are trained with a
classifier so that the triggers are learnable, and with a *diversity* loss
``||x1 - x2|| / ||G(x1) - G(x2)||`` so that different images get different triggers.
As in the ABL paper (appendix, Section A), the trained generators then poison 10% of the
training set (all-to-one) and the victim trains on it from scratch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from abl.attacks import surrogate
from abl.attacks.base import ATTACKS, Attack
from abl.config import check
from abl.data.loader import random_crop, random_flip, to_float
from abl.data.types import ImageSplit, PoisonedSet
from abl.engine import progress_bar
from abl.errors import ConfigError

_EPS = 1e-7
_APPLY_CHUNK = 256  # images per generator call in apply (bounds activation memory at 224 px)


def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class TriggerGenerator(nn.Sequential):
    """The encoder-decoder of Nguyen & Tran (2020): ``depth`` levels of two conv-BN-ReLU
    blocks and a 2x max-pool, a middle block, then ``depth`` levels of a 2x upsample and
    two blocks back to ``out_channels``. The output is ``tanh(h) / 2 + 0.5`` in (0, 1).

    Inputs are images in [0, 1]; they are centred to [-1, 1] inside, so the generator
    does not depend on a dataset's normalisation constants.
    """

    def __init__(self, out_channels: int, width: int = 32, depth: int = 3, in_channels: int = 3) -> None:
        layers: list[nn.Module] = []
        cin, cout = in_channels, width
        for level in range(depth):
            layers += _block(cin, cout) + _block(cout, cout) + [nn.MaxPool2d(2)]
            if level < depth - 1:
                cin, cout = cout, cout * 2
        layers += _block(cout, cout)
        channels = cout
        for level in range(depth):
            nxt = out_channels if level == depth - 1 else channels // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            layers += _block(channels, channels) + _block(channels, nxt, relu=level < depth - 1)
            channels = nxt
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.tanh(super().forward(x * 2 - 1)) / (2 + _EPS) + 0.5


def sharpen(mask: torch.Tensor) -> torch.Tensor:
    """The soft threshold of the mask generator's output: values above 0.5 go to ~1,
    below to ~0, with a usable gradient in between (``tanh(20 m - 10) / 2 + 0.5``)."""
    return torch.tanh(mask * 20 - 10) / (2 + _EPS) + 0.5


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``rms(x1 - x2) / rms(t1 - t2)``: small when different inputs get
    triggers (patterns or masks) at least as different as the inputs themselves."""
    dx = (x1 - x2).pow(2).mean((1, 2, 3)).sqrt()
    dt = (t1 - t2).pow(2).mean((1, 2, 3)).sqrt()
    return (dx / (dt + _EPS)).mean()


@ATTACKS.register("dynamic")
@dataclass
class Dynamic(surrogate.SurrogateParams, Attack):
    """Input-aware dynamic backdoor: per-image triggers from trained generators.

    Fitting (:meth:`fit`, run by :meth:`poison`, cached by its settings and the data's
    hash) follows Nguyen & Tran (2020):

    1. The mask generator is trained alone for ``mask_epochs`` (25) with Adam
       (``generator_lr`` 0.01, betas 0.5/0.9, lr / 10 at 40% and 80%) on
       ``lambda_norm * mean(relu(m(x1) - mask_density)) + lambda_div * div(x1, x2, m)``:
       sparse masks (``mask_density`` 0.032) that differ between images. It is then frozen.
    2. The attacker's classifier (``surrogate_model``, trained from scratch here, not a
       clean model) and the pattern generator are trained together for
       ``surrogate_epochs``. In each batch a ``p_attack`` share (0.1) carries its own
       trigger and the attack label, a ``p_cross`` share (0.1) carries the trigger of
       *another* image and keeps its label (the cross-trigger mode, which forces triggers
       to be image-specific), and the rest is clean; the loss is cross-entropy plus
       ``lambda_div * div(x1, x2, G)``. Classifier: SGD (``surrogate_lr`` 0.01, momentum
       0.9, weight decay 5e-4, lr / 10 at 1/6, 2/6, 3/6, 4/6 of the epochs, as the
       authors' 100-200-300-400 of 600); generator: Adam (``generator_lr``, lr / 10 at
       2/6 to 5/6). Images are randomly cropped (padding 4) and flipped before the
       triggers are made (the authors also rotate by up to 10 degrees; we do not).

    Poisoning then triggers ``rate`` of the training set with the frozen generators and
    relabels it (all2one or all2all); the victim never sees the attacker's classifier.
    The generators' weights (``pattern.*``, ``mask.*``) and the attacker classifier's
    last-epoch clean, backdoor and cross-trigger accuracies (``fit_accuracy``) are the
    run's artefacts.

    Defaults are the authors' CIFAR-10 settings (PreAct-ResNet-18, 600 epochs, generator
    width 32, depth 3); generation is the expensive part and is cached, so a sweep pays
    for it once, and a fit that is killed part-way resumes from its last checkpoint
    (:class:`~abl.attacks.surrogate.FitCheckpoint`, beside the cache file) to the same
    generators. ``surrogate_seed`` seeds the whole fit; ``seed`` only which examples are
    poisoned.

    Parameters:
        mask_epochs: mask-generator epochs (25).
        mask_density: the mask sparsity target (0.032).
        lambda_div, lambda_norm: weights of the diversity and mask-norm losses (1, 100).
        p_attack, p_cross: shares of each batch in backdoor and cross-trigger mode (0.1, 0.1).
        generator_lr: Adam learning rate of both generators (0.01).
        generator_width, generator_depth: first-level channels and levels (32, 3);
            the image side must be divisible by ``2 ** generator_depth``.
        surrogate_model, surrogate_epochs, surrogate_lr, surrogate_batch_size,
        surrogate_seed: the attacker's classifier and schedule (batch 128), and the seed.
        cache_dir: where the fitted generators are cached.

    Example::

        ATTACKS.create({"name": "dynamic", "rate": 0.1, "target": 0, "surrogate_epochs": 100})
    """

    surrogate_model: str = "preact_resnet18"
    surrogate_epochs: int = 600
    surrogate_lr: float = 0.01
    mask_epochs: int = 25
    mask_density: float = 0.032
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    p_attack: float = 0.1
    p_cross: float = 0.1
    generator_lr: float = 0.01
    generator_width: int = 32
    generator_depth: int = 3

    needs_fit: ClassVar[bool] = True
    fit_product: ClassVar[str] = "the trigger generators, which are trained on the training set"

    def validate(self) -> None:
        super().validate()
        self.validate_surrogate()
        check(self.mask_epochs >= 1, "attack.mask_epochs", f"must be >= 1, got {self.mask_epochs}")
        check(0.0 < self.mask_density < 1.0, "attack.mask_density", f"must be in (0, 1), got {self.mask_density}")
        check(self.lambda_div >= 0, "attack.lambda_div", f"must be >= 0, got {self.lambda_div}")
        check(self.lambda_norm >= 0, "attack.lambda_norm", f"must be >= 0, got {self.lambda_norm}")
        check(0.0 < self.p_attack < 1.0, "attack.p_attack", f"must be in (0, 1), got {self.p_attack}")
        check(0.0 < self.p_cross < 1.0, "attack.p_cross", f"must be in (0, 1), got {self.p_cross}")
        check(self.p_attack + self.p_cross < 1.0, "attack.p_cross", "p_attack + p_cross must leave clean examples in each batch")
        check(
            int(self.p_attack * self.surrogate_batch_size) >= 1 and int(self.p_cross * self.surrogate_batch_size) >= 1,
            "attack.surrogate_batch_size",
            f"is {self.surrogate_batch_size}, too small for at least one backdoor and one cross-trigger "
            "example per batch; raise it or p_attack/p_cross",
        )
        check(self.generator_lr > 0, "attack.generator_lr", f"must be > 0, got {self.generator_lr}")
        check(self.generator_width >= 1, "attack.generator_width", f"must be >= 1, got {self.generator_width}")
        check(self.generator_depth >= 1, "attack.generator_depth", f"must be >= 1, got {self.generator_depth}")

    def build(self, image_size: int) -> None:
        step = 2**self.generator_depth
        check(
            image_size % step == 0,
            "attack.generator_depth",
            f"is {self.generator_depth}, so the image side must be divisible by {step}, but it is {image_size}",
        )
        self.state: dict[str, torch.Tensor] | None = None
        self._nets: dict[torch.device, tuple[TriggerGenerator, TriggerGenerator]] = {}

    # -- the generators ---------------------------------------------------------------
    def _new_generators(self) -> tuple[TriggerGenerator, TriggerGenerator]:
        pattern = TriggerGenerator(3, self.generator_width, self.generator_depth)
        mask = TriggerGenerator(1, self.generator_width, self.generator_depth)
        return pattern, mask

    @property
    def fitted(self) -> bool:
        return self.state is not None

    def _generators(self, device: torch.device) -> tuple[TriggerGenerator, TriggerGenerator]:
        """The fitted generators on ``device``, in eval mode (built once per device)."""
        if device not in self._nets:
            assert self.state is not None
            pattern, mask = self._new_generators()
            pattern.load_state_dict({k[len("pattern."):]: v for k, v in self.state.items() if k.startswith("pattern.")})
            mask.load_state_dict({k[len("mask."):]: v for k, v in self.state.items() if k.startswith("mask.")})
            for net in (pattern, mask):
                net.to(device).eval().requires_grad_(False)
            self._nets[device] = (pattern, mask)
        return self._nets[device]

    def trigger(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-image pattern ``(N, 3, H, W)`` and sharpened mask ``(N, 1, H, W)`` of ``x``."""
        self.require_fit("trigger")
        pattern_net, mask_net = self._generators(x.device)
        with torch.no_grad():
            xf = x.float()
            return pattern_net(xf).to(x.dtype), sharpen(mask_net(xf)).to(x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.require_fit("apply")
        out = torch.empty_like(x)
        for s in range(0, len(x), _APPLY_CHUNK):
            chunk = x[s : s + _APPLY_CHUNK]
            pattern, mask = self.trigger(chunk)
            out[s : s + _APPLY_CHUNK] = torch.lerp(chunk, pattern, mask).clamp_(0, 1)
        return out

    def artefacts(self) -> dict[str, torch.Tensor]:
        return dict(self.state) if self.state is not None else {}

    # -- fitting ----------------------------------------------------------------------
    def _fit_key(self, fingerprint: str) -> dict[str, object]:
        return {
            "surrogate": self.surrogate_key(),
            "num_classes": self.num_classes,
            "target": self.target,
            "labelling": self.labelling,
            "mask_epochs": self.mask_epochs,
            "mask_density": self.mask_density,
            "lambda_div": self.lambda_div,
            "lambda_norm": self.lambda_norm,
            "p_attack": self.p_attack,
            "p_cross": self.p_cross,
            "generator_lr": self.generator_lr,
            "generator_width": self.generator_width,
            "generator_depth": self.generator_depth,
            "data": fingerprint,
        }

    def _batches(self, n: int, gen: torch.Generator, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of index pairs: two independent shuffles, as the authors' two loaders."""
        bs = self.surrogate_batch_size
        a = torch.randperm(n, generator=gen).to(device)
        b = torch.randperm(n, generator=gen).to(device)
        return [(a[s : s + bs], b[s : s + bs]) for s in range(0, n - bs + 1 if n >= bs else 1, bs)]

    def _train(
        self, train: ImageSplit, device: torch.device, checkpoint: surrogate.FitCheckpoint | None = None
    ) -> dict[str, torch.Tensor]:
        """The two stages of the authors' fit; with ``checkpoint``, progress is saved at
        epoch ends and a saved fit of this key resumes exactly where it stopped (the
        weights, optimiser buffers, learning rates and random-number states are restored, so
        a resumed fit ends with the same generators as an uninterrupted one)."""
        from abl.models import MODELS

        torch.manual_seed(self.surrogate_seed)
        gen = torch.Generator().manual_seed(self.surrogate_seed)
        aug = torch.Generator(device=device).manual_seed(self.surrogate_seed + 1)
        images = train.images.to(device)
        labels = train.labels.to(device)
        n = len(labels)

        def load(idx: torch.Tensor) -> torch.Tensor:
            return random_flip(random_crop(to_float(images[idx]), 4, aug), aug)

        pattern_net, mask_net = (g.to(device) for g in self._new_generators())
        opt_m = torch.optim.Adam(mask_net.parameters(), self.generator_lr, betas=(0.5, 0.9))
        sched_m = torch.optim.lr_scheduler.MultiStepLR(opt_m, _fractions(self.mask_epochs, (0.4, 0.8)), 0.1)
        classifier = opt_c = opt_g = None  # built after the mask stage; read by save()
        correct = torch.zeros(3, device=device)
        counts = torch.zeros(3, device=device)

        def rng_state() -> dict[str, torch.Tensor]:
            out = {"rng.gen": gen.get_state(), "rng.aug": aug.get_state(), "rng.global": torch.get_rng_state()}
            if device.type == "cuda":
                out["rng.cuda"] = torch.cuda.get_rng_state(device)
            return out

        def save(stage: str, done: int, last: bool) -> None:
            if checkpoint is None or not (last or checkpoint.due()):
                return
            tensors = {**surrogate.module_tensors("pattern", pattern_net), **surrogate.module_tensors("mask", mask_net)}
            tensors.update(rng_state())
            meta = {"stage": stage, "done": str(done), "device": device.type}
            t, meta["opt_m"] = surrogate.optimizer_tensors("opt_m", opt_m)
            tensors.update(t)
            if classifier is not None:
                assert opt_c is not None and opt_g is not None
                tensors.update(surrogate.module_tensors("classifier", classifier))
                for name, opt in (("opt_c", opt_c), ("opt_g", opt_g)):
                    t, meta[name] = surrogate.optimizer_tensors(name, opt)
                    tensors.update(t)
                tensors.update({"acc.correct": correct, "acc.counts": counts})
            checkpoint.save(tensors, meta)

        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None and saved[1].get("device") != device.type:
            # random-number states do not carry between device types: a CPU fit moved to a
            # GPU starts over there (where it is fast)
            warnings.warn(
                f"fit checkpoint {checkpoint.path if checkpoint else ''} was made on {saved[1].get('device')}, "
                f"this fit runs on {device.type}: starting over",
                stacklevel=2,
            )
            saved = None

        def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
            gen.set_state(tensors["rng.gen"])
            aug.set_state(tensors["rng.aug"])
            torch.set_rng_state(tensors["rng.global"])
            if "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)

        mask_done = 0
        if saved is not None:
            tensors, meta = saved
            surrogate.load_module(pattern_net, "pattern", tensors)
            surrogate.load_module(mask_net, "mask", tensors)
            surrogate.load_optimizer(opt_m, "opt_m", tensors, meta["opt_m"])
            mask_done = self.mask_epochs if meta["stage"] == "pattern" else int(meta["done"])
            sched_m.last_epoch = mask_done
            if meta["stage"] == "mask":
                restore_rng(tensors)

        # Stage 1: the mask generator alone.
        mask_net.train()
        for epoch in progress_bar(range(mask_done, self.mask_epochs), "dynamic: mask generator", None):
            for i1, i2 in self._batches(n, gen, device):
                x1, x2 = load(i1), load(i2)
                m1, m2 = sharpen(mask_net(x1)), sharpen(mask_net(x2))
                loss = self.lambda_norm * F.relu(m1 - self.mask_density).mean() + self.lambda_div * diversity_loss(x1, x2, m1, m2)
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
            sched_m.step()
            save("mask", epoch + 1, last=False)
        mask_net.eval().requires_grad_(False)

        # Stage 2: the classifier and the pattern generator together.
        classifier = MODELS.create({"name": self.surrogate_model}, "attack.surrogate_model").build(
            self.num_classes, int(images.shape[-1])
        ).to(device)
        epochs = self.surrogate_epochs
        opt_c = torch.optim.SGD(classifier.parameters(), self.surrogate_lr, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(pattern_net.parameters(), self.generator_lr, betas=(0.5, 0.9))
        sched_c = torch.optim.lr_scheduler.MultiStepLR(opt_c, _fractions(epochs, (1 / 6, 2 / 6, 3 / 6, 4 / 6)), 0.1)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, _fractions(epochs, (2 / 6, 3 / 6, 4 / 6, 5 / 6)), 0.1)
        done = 0
        if saved is not None and saved[1]["stage"] == "pattern":
            tensors, meta = saved
            surrogate.load_module(classifier, "classifier", tensors)
            surrogate.load_optimizer(opt_c, "opt_c", tensors, meta["opt_c"])
            surrogate.load_optimizer(opt_g, "opt_g", tensors, meta["opt_g"])
            done = int(meta["done"])
            sched_c.last_epoch = sched_g.last_epoch = done
            correct.copy_(tensors["acc.correct"])
            counts.copy_(tensors["acc.counts"])
            restore_rng(tensors)
        else:
            save("pattern", 0, last=True)  # the mask stage is done: keep it whatever comes next
        classifier.train()
        pattern_net.train()
        # generation can take hours: a bar on a terminal, nothing in logs
        bar = progress_bar(range(done, epochs), "dynamic: pattern generator + classifier", None)
        for epoch in bar:
            correct.zero_()
            counts.zero_()
            for i1, i2 in self._batches(n, gen, device):
                x1, x2 = load(i1), load(i2)
                y1 = labels[i1]
                nb = max(1, int(self.p_attack * len(i1)))
                nc = max(1, int(self.p_cross * len(i1)))
                p_bd = pattern_net(x1[:nb])
                bd = x1[:nb] + (p_bd - x1[:nb]) * sharpen(mask_net(x1[:nb]))
                p_cross = pattern_net(x2[:nc])
                cross = x1[nb : nb + nc] + (p_cross - x1[nb : nb + nc]) * sharpen(mask_net(x2[:nc]))
                inputs = torch.cat([bd, cross, x1[nb + nc :]])
                targets = torch.cat([self.relabel(y1[:nb]), y1[nb:]])
                logits = classifier(inputs)
                k = min(nb, nc)
                loss = F.cross_entropy(logits, targets) + self.lambda_div * diversity_loss(x1[:k], x2[:k], p_bd[:k], p_cross[:k])
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"attack 'dynamic': the generator training diverged at epoch {epoch + 1}; "
                        "lower attack.surrogate_lr or attack.generator_lr"
                    )
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()
                with torch.no_grad():
                    hit = logits.argmax(1) == targets
                    for j, part in enumerate((slice(0, nb), slice(nb, nb + nc), slice(nb + nc, None))):
                        correct[j] += hit[part].sum()
                        counts[j] += hit[part].numel()
            sched_c.step()
            sched_g.step()
            save("pattern", epoch + 1, last=False)
            if not bar.disable:  # one device sync per epoch, only when someone watches
                bd, cross, clean = (correct / counts.clamp_min(1)).tolist()
                bar.set_postfix(clean=f"{clean:.2f}", backdoor=f"{bd:.2f}", cross=f"{cross:.2f}")
        acc = (correct / counts.clamp_min(1)).cpu()
        state = {f"pattern.{k}": v for k, v in pattern_net.state_dict().items()}
        state.update({f"mask.{k}": v for k, v in mask_net.state_dict().items()})
        # order: clean, backdoor, cross-trigger (the authors' three accuracies)
        state["fit_accuracy"] = torch.stack([acc[2], acc[0], acc[1]])
        return state

    def fit(self, train: ImageSplit, device: torch.device | str = "cpu") -> None:
        """Train (or load from the cache) the mask and pattern generators on ``train``."""
        device = torch.device(device)
        key = self._fit_key(surrogate.data_fingerprint(train))
        checkpoint = surrogate.FitCheckpoint(surrogate.cache_path("dynamic", key, self.cache_dir))
        self.state = surrogate.cached_tensors("dynamic", key, lambda: self._train(train, device, checkpoint), self.cache_dir)
        checkpoint.discard()  # the finished fit is cached: its progress file is spent
        self._nets.clear()

    @property
    def fit_accuracy(self) -> dict[str, float]:
        """The attacker classifier's last-epoch training accuracies (clean, backdoor, cross)."""
        self.require_fit("fit_accuracy")
        assert self.state is not None
        clean, backdoor, cross = (float(v) for v in self.state["fit_accuracy"])
        return {"clean": clean, "backdoor": backdoor, "cross": cross}

    def fit_metrics(self) -> dict[str, float]:
        if not self.fitted:
            return {}
        return {f"fit_{k}_acc": v for k, v in self.fit_accuracy.items()}

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Fit the generators on the clean ``train`` split (cached), then trigger and relabel."""
        self.fit(train, device)
        return super().poison(train, device)


def _fractions(epochs: int, fractions: tuple[float, ...]) -> list[int]:
    """Milestones at ``fractions`` of ``epochs`` (distinct, inside the run)."""
    return sorted({m for m in (int(round(f * epochs)) for f in fractions) if 0 < m < epochs})

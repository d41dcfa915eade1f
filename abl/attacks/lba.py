"""Latent backdoor (Yao, Li, Zheng & Zhao, "Latent Backdoor Attacks on Deep Neural
Networks", ACM CCS 2019), in the data-poisoning form backdoor benchmarks use.

The original plants a backdoor in a teacher model whose latent representation of the
trigger matches a target class that the teacher does not even have, so that it survives
transfer learning into student models; that teacher-student transfer is outside ABL's
threat model (the defender trains from scratch on poisoned data). What carries over is the
trigger: a patch optimised so that, through a surrogate trained on clean data, the
intermediate representation of any triggered image matches the mean representation of
the target class. Poisoned examples carry it with the target label; because the trigger
already "looks like" the target to a clean model's features, the backdoor is easy to
learn and hard to tell from the target class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from abl.attacks import surrogate
from abl.attacks.base import ATTACKS, Attack
from abl.attacks.trojannn import trigger_region
from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet

_PROBE_IMAGES = 128  # non-target images the trigger is optimised on
_TARGET_IMAGES = 256  # target-class images whose mean representation is matched


@ATTACKS.register("lba")
@dataclass
class LatentBackdoor(surrogate.SurrogateParams, Attack):
    """LBA: a patch trigger whose latent representation matches the target class.

    1. A surrogate (``surrogate_*``) is trained on the clean training set.
    2. The target representation is the mean of ``layer`` over up to 256 seeded
       target-class training images.
    3. The pixels of the trigger region (``mask``/``size``/``mask_file``, as TrojanNN)
       are optimised with Adam (``steps``, ``lr``), clamped to [0, 1], to minimise the
       mean squared distance between ``layer`` of 128 seeded non-target images stamped
       with them and the target representation.
    4. Poisoning stamps the trigger and relabels to ``target`` (dirty-label, all2one).

    The trigger is cached by its settings and the data's hash; ``surrogate_seed`` seeds
    the preparation and ``seed`` only the choice of poisoned examples.

    Parameters:
        mask, size, mask_file: the trigger region (a 5x5 square by default).
        layer: ``features`` (the penultimate, pooled representation) or ``feature_maps``
            (the last convolutional map, flattened).
        steps, lr: the trigger optimisation (300 Adam steps at 0.05).
        surrogate_model, surrogate_epochs, surrogate_lr, surrogate_batch_size,
        surrogate_seed: the clean surrogate (WRN-16-1, 10 epochs at 0.05).
        cache_dir: where the surrogate and the trigger are cached.
    """

    mask: Literal["square", "file"] = "square"
    size: int = 5
    mask_file: str | None = None
    layer: Literal["features", "feature_maps"] = "features"
    steps: int = 300
    lr: float = 0.05

    needs_fit: ClassVar[bool] = True
    fit_product: ClassVar[str] = "the trigger, which is optimised against a clean model of the training set"

    def validate(self) -> None:
        super().validate()
        check(self.labelling == "all2one", "attack.labelling", "must be all2one: the trigger imitates one target class")
        check(self.size >= 1, "attack.size", f"must be >= 1, got {self.size}")
        if self.mask == "file":
            check(self.mask_file is not None, "attack.mask_file", "is required when attack.mask is 'file'")
        else:
            check(self.mask_file is None, "attack.mask_file", "is only used with attack.mask: file")
        check(self.steps >= 1, "attack.steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, "attack.lr", f"must be > 0, got {self.lr}")
        self.validate_surrogate()

    def build(self, image_size: int) -> None:
        self.region = trigger_region(self.mask, self.size, self.mask_file, image_size)
        self.pattern_image: torch.Tensor | None = None
        self.trigger_mask: torch.Tensor | None = None
        self.surrogate: torch.nn.Module | None = None
        self.latent_gap: dict[str, float] = {}

    @property
    def fitted(self) -> bool:
        return self.pattern_image is not None

    def artefacts(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            return {"region": self.region}
        assert self.trigger_mask is not None and self.pattern_image is not None
        return {"mask": self.trigger_mask, "pattern": self.pattern_image}

    def fit_metrics(self) -> dict[str, float]:
        return dict(self.latent_gap)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.require_fit("apply")
        t = self._on(x.device, mask=self.trigger_mask, pattern=self.pattern_image)
        return torch.lerp(x, t["pattern"].to(x.dtype), t["mask"].to(x.dtype))

    def representation(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` latent representation of float images ``x`` at ``layer``."""
        return model.features(x) if self.layer == "features" else model.feature_maps(x).flatten(1)

    def _optimise(self, model: torch.nn.Module, probe: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        device = probe.device
        m = self.region.to(device)
        model.eval().requires_grad_(False)
        with torch.no_grad():
            goal = self.representation(model, targets).float().mean(0, keepdim=True)
            scale = self.representation(model, probe).float().sub(goal).pow(2).mean()
        gen = torch.Generator().manual_seed(self.surrogate_seed + 1)
        pattern = (torch.rand(3, *m.shape[-2:], generator=gen).to(device) * m).requires_grad_(True)
        with torch.no_grad():
            start = self.representation(model, torch.lerp(probe, pattern, m)).float().sub(goal).pow(2).mean()
        opt = torch.optim.Adam([pattern], lr=self.lr)
        for _ in range(self.steps):
            rep = self.representation(model, torch.lerp(probe, pattern, m)).float()
            loss = (rep - goal).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                pattern.clamp_(0, 1).mul_(m)
        with torch.no_grad():
            end = self.representation(model, torch.lerp(probe, pattern, m)).float().sub(goal).pow(2).mean()
        gap = torch.stack([scale, start, end]).cpu()
        return {"pattern": pattern.detach(), "mask": m.clone(), "gap": gap}

    def fit(self, train: ImageSplit, device: torch.device | str = "cpu") -> None:
        """Train (or load) the surrogate and optimise (or load) the trigger."""
        fingerprint = surrogate.data_fingerprint(train)
        key = {
            "surrogate": self.surrogate_key(), "num_classes": self.num_classes, "target": self.target,
            "region": surrogate.tensor_digest(self.region), "layer": self.layer, "steps": self.steps, "lr": self.lr,
            "probe": _PROBE_IMAGES, "targets": _TARGET_IMAGES, "data": fingerprint,
        }

        def build() -> dict[str, torch.Tensor]:
            self.surrogate = self.load_surrogate(train, self.num_classes, device, fingerprint)
            gen = torch.Generator().manual_seed(self.surrogate_seed)
            labels = train.labels.cpu()
            others = (labels != self.target).nonzero().squeeze(1)
            own = (labels == self.target).nonzero().squeeze(1)
            probe = others[torch.randperm(len(others), generator=gen)[:_PROBE_IMAGES]]
            tgt = own[torch.randperm(len(own), generator=gen)[:_TARGET_IMAGES]]
            return self._optimise(self.surrogate, to_float(train.images[probe].to(device)),
                                  to_float(train.images[tgt].to(device)))

        result = surrogate.cached_tensors("lba", key, build, self.cache_dir)
        self.pattern_image, self.trigger_mask = result["pattern"], result["mask"]
        scale, start, end = (float(v) for v in result["gap"])
        # the squared latent distance to the target's mean: clean images, a random patch,
        # the optimised trigger (recorded under the run's ``attack`` metrics)
        self.latent_gap = {"latent_gap_clean": scale, "latent_gap_random": start, "latent_gap_trigger": end}
        self._cache.clear()

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Fit the trigger on the clean ``train`` split (cached), then stamp and relabel."""
        self.fit(train, device)
        return super().poison(train, device)

"""Feature-collision (FC) backdoor with a hidden trigger (Shafahi et al., "Poison Frogs!
Targeted Clean-Label Poisoning Attacks on Neural Networks", NeurIPS 2018, in the backdoor
form of Saha, Subramanya & Pirsiavash, "Hidden Trigger Backdoor Attacks", AAAI 2020):
clean-label target images perturbed so that their features collide with triggered
source images; the trigger never appears in the training set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from abl.attacks import surrogate
from abl.attacks.badnets import AUTHORS_GRID
from abl.attacks.base import ATTACKS, CleanLabelAttack
from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet
from abl.errors import ConfigError

_FC_BATCH = 256


@ATTACKS.register("fc")
@dataclass
class FeatureCollision(surrogate.SurrogateParams, CleanLabelAttack):
    """Feature-collision (FC) hidden-trigger backdoor: clean-label, so only target-class
    images are poisoned and no label changes.

    Each selected target-class image ``x`` is paired (seeded by ``seed``; with replacement
    when there are fewer source-class images than poisoned ones) with a source-class
    training image ``s`` carrying the trigger, and perturbed within an L-inf ball of
    ``eps`` so that its penultimate features under a surrogate model trained on the clean
    training set approach those of ``s + trigger``::

        min_delta ||f(x + delta) - f(s + trigger)||^2,  ||delta||_inf <= eps,  x + delta in [0, 1]

    (``steps`` signed-gradient steps of ``lr``, projected after each). The poisoned images
    look like (and are labelled as) the target class and carry no trigger; a model trained
    on them learns to map the features of triggered source images to the target, so at
    test time :meth:`apply` stamps only the trigger and :meth:`triggered_test` holds the
    triggered SOURCE-class test images (attack label: ``target``).

    Trigger: the ABL authors' 3x3 grid (:data:`~abl.attacks.badnets.AUTHORS_GRID`, tiled
    for other sizes) as a ``patch_size`` x ``patch_size`` patch in the bottom-right corner.
    It is fixed, so :meth:`apply` works before :meth:`poison`.

    The surrogate (``surrogate_*``, seeded by ``surrogate_seed``) and the perturbed images
    are cached on disk by their settings, the poisoned and paired indices and the data's
    hash (``cache_dir``, default ``$ABL_CACHE_DIR`` or ``~/.cache/abl``); :meth:`artefacts`
    returns the trigger and, once poisoned, the perturbed images, their indices and the
    indices of their paired source images.

    ``rate`` is a share of the whole training set unless ``rate_of: target_class``
    (:class:`~abl.attacks.base.CleanLabelAttack`).

    Parameters:
        source: the source class whose triggered images are flipped to ``target`` (1).
        eps: L-inf budget of the perturbation, in [0, 1] units (16/255).
        steps: optimisation steps (100).
        lr: signed-gradient step (0.01).
        patch_size: side of the square trigger patch (3).
        watermark: opacity of the triggered source image blended into each target image
            before the perturbation (0: none). Shafahi et al. add such a watermark (up to
            0.3) when the victim trains end to end rather than only its last layer; the
            ``eps`` ball is then centred on the watermarked image.
        surrogate_model: model name of the surrogate (``wrn``: WRN-16-1).
        surrogate_epochs, surrogate_lr, surrogate_batch_size, surrogate_seed: its training.
        cache_dir: where the surrogate and the perturbed set are cached.

    Example::

        ATTACKS.create({"name": "fc", "rate": 0.5, "rate_of": "target_class", "target": 0, "source": 1})  # half of class 0
    """

    #: the name its perturbed sets are cached under (a subclass crafting them otherwise
    #: must use its own)
    cache_kind: ClassVar[str] = "fc"

    source: int = 1
    eps: float = 16 / 255
    steps: int = 100
    lr: float = 0.01
    patch_size: int = 3
    watermark: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(self.source >= 0, "attack.source", f"must be a class index >= 0, got {self.source}")
        check(self.source != self.target, "attack.source", f"must differ from attack.target ({self.target})")
        check(0.0 < self.eps <= 1.0, "attack.eps", f"must be in (0, 1] (a fraction of 255), got {self.eps}")
        check(self.steps >= 1, "attack.steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, "attack.lr", f"must be > 0, got {self.lr}")
        check(self.patch_size >= 1, "attack.patch_size", f"must be >= 1, got {self.patch_size}")
        check(0.0 <= self.watermark < 1.0, "attack.watermark", f"must be in [0, 1), got {self.watermark}")
        self.validate_surrogate()

    # -- trigger --------------------------------------------------------------------
    def setup(self, image_size: int, num_classes: int) -> None:
        super().setup(image_size, num_classes)
        check(self.source < num_classes, "attack.source", f"is {self.source} but the dataset has {num_classes} classes")

    def build(self, image_size: int) -> None:
        s = self.patch_size
        check(s <= image_size, "attack.patch_size", f"is {s} but the images are {image_size}x{image_size}")
        patch = self.patch()
        far = image_size - s
        self.mask = torch.zeros(1, image_size, image_size)
        self.mask[:, far:, far:] = 1.0
        self.pattern_image = torch.zeros(3, image_size, image_size)
        self.pattern_image[:, far:, far:] = patch
        self.perturbed: torch.Tensor | None = None
        self.perturbed_index: torch.Tensor | None = None
        self.source_index: torch.Tensor | None = None

    def patch(self) -> torch.Tensor:
        """The ``(3, patch_size, patch_size)`` trigger patch: the authors' grid, tiled."""
        s = self.patch_size
        reps = -(-s // 3)
        return AUTHORS_GRID.repeat(reps, reps)[:s, :s].expand(3, s, s)

    def artefacts(self) -> dict[str, torch.Tensor]:
        out = {"mask": self.mask, "pattern": self.pattern_image}
        if self.perturbed is not None and self.perturbed_index is not None and self.source_index is not None:
            out["perturbed_images"] = self.perturbed
            out["perturbed_indices"] = self.perturbed_index
            out["source_indices"] = self.source_index
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp_patch(x)

    # -- the feature collision --------------------------------------------------------
    def pair(self, labels: torch.Tensor, n: int) -> torch.Tensor:
        """Seeded indices of ``n`` source-class examples, one per poisoned image (with
        replacement only when there are fewer than ``n``)."""
        candidates = (labels.cpu() == self.source).nonzero().squeeze(1)
        if len(candidates) == 0:
            raise ConfigError(f"'attack.source' {self.source}: the training set has no image of the source class")
        gen = torch.Generator().manual_seed(self.seed + 7919)  # apart from select()'s stream
        if len(candidates) >= n:
            pick = torch.randperm(len(candidates), generator=gen)[:n]
        else:
            pick = torch.randint(len(candidates), (n,), generator=gen)
        return candidates[pick]

    def _collide(self, model: torch.nn.Module, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """uint8 ``images`` (watermarked, if ``watermark`` > 0) perturbed within ``eps`` so
        that their features approach those of the triggered uint8 ``sources`` (same length),
        in batches."""
        out = torch.empty_like(images)
        for b in range(0, len(images), _FC_BATCH):
            triggered = self.apply(to_float(sources[b : b + _FC_BATCH]))
            x0 = torch.lerp(to_float(images[b : b + _FC_BATCH]), triggered, self.watermark)
            with torch.no_grad():
                goal = model.features(triggered).float()
            x = x0.clone()
            for _ in range(self.steps):
                x.requires_grad_(True)
                loss = (model.features(x).float() - goal).pow(2).sum()
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = x - self.lr * grad.sign()
                    x = torch.min(torch.max(x, x0 - self.eps), x0 + self.eps).clamp_(0, 1)
            out[b : b + _FC_BATCH] = x.detach().mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        return out

    def choose(self, train: ImageSplit, device: torch.device | str) -> torch.Tensor:
        """The boolean mask of the target-class images to perturb: seeded at random
        (:meth:`select`); a subclass may choose by the surrogate."""
        return self.select(train.labels)

    def extra_key(self) -> dict[str, object]:
        """Settings of a subclass's crafting that its cache key must also hold."""
        return {}

    def fit(self, train: ImageSplit, mask: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The feature-collision uint8 images of the examples in ``mask`` (cached)."""
        idx = mask.nonzero().squeeze(1).cpu()
        src = self.pair(train.labels, len(idx))
        fingerprint = surrogate.data_fingerprint(train)
        key = {
            "surrogate": self.surrogate_key(),
            "num_classes": self.num_classes,
            "source": self.source,
            "target": self.target,
            "eps": self.eps,
            "steps": self.steps,
            "lr": self.lr,
            "watermark": self.watermark,
            "trigger": surrogate.tensor_digest(self.pattern_image * self.mask),
            "indices": surrogate.tensor_digest(idx.to(torch.int64)),
            "sources": surrogate.tensor_digest(src.to(torch.int64)),
            "data": fingerprint,
            **self.extra_key(),
        }

        def build() -> dict[str, torch.Tensor]:
            model = self.load_surrogate(train, self.num_classes, device, fingerprint)
            self._crafting = (train, idx, device, src)  # for a subclass that retrains or re-stamps while crafting
            images = train.images[idx].to(device)
            sources = train.images[src].to(device)
            return {"images": self._collide(model, images, sources), "indices": idx, "sources": src}

        result = surrogate.cached_tensors(self.cache_kind, key, build, self.cache_dir)
        self.perturbed, self.perturbed_index, self.source_index = result["images"], result["indices"], result["sources"]
        return self.perturbed

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Select target-class images and perturb them towards triggered source images
        (cached); no trigger is stamped and no label changes."""
        mask = self.choose(train, device)
        perturbed = self.fit(train, mask, device)
        images = train.images.to(device, copy=True)
        labels = train.labels.to(device)
        idx = mask.nonzero().squeeze(1).to(device)
        images[idx] = perturbed.to(device)
        return PoisonedSet(images, labels.clone(), labels, mask.to(device))

    def test_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Only the SOURCE-class test images are scored: the attack flips triggered source
        images to ``target`` (:meth:`triggered_test` gives them with attack label ``target``)."""
        return labels == self.source

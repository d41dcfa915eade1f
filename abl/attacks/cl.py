"""Label-consistent backdoor (Turner, Tsipras & Madry, "Label-Consistent Backdoor
Attacks", 2019, arXiv 1912.02771): clean-label, adversarially perturbed target images
carrying a small grid trigger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from abl.attacks import surrogate
from abl.attacks.badnets import AUTHORS_GRID
from abl.attacks.base import ATTACKS, CleanLabelAttack
from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet

_PGD_BATCH = 256


@ATTACKS.register("cl")
@dataclass
class LabelConsistent(surrogate.SurrogateParams, CleanLabelAttack):
    """Label-consistent (CL) backdoor: clean-label, so only target-class images are
    poisoned and no label changes.

    Each selected target-class image is first made hard to learn from its content by an
    L-inf PGD perturbation (``steps`` signed-gradient steps of ``step_size`` within ``eps``,
    starting at the image) that MAXIMISES the cross-entropy of its true label under a
    surrogate model trained on the clean training set; then the trigger is stamped. The
    model can only fit these images by learning the trigger, which it then associates
    with the target class. At test time (:meth:`apply`) only the trigger is stamped.

    Trigger: the ABL authors' 3x3 grid (:data:`~abl.attacks.badnets.AUTHORS_GRID`) in the
    bottom-right corner, or (``corners=4``) reflected into all four corners (Turner et
    al.'s variant that survives horizontal flips), blended at ``amplitude``
    (``lerp(x, grid, amplitude)`` on the 3x3 patch).
    On a 5,000-image CIFAR-10 slice the one-corner grid was learned at 0.2-79% ASR
    (depending on the surrogate) and the four-corner grid at 96-100%, so the example
    config uses ``corners: 4``; the default stays one corner, the ABL authors' grid.

    The surrogate (``surrogate_*``, trained once, seeded by ``surrogate_seed`` so that runs
    with different ``seed`` share it) and the perturbed images are cached on disk by their
    settings and the data's hash (``cache_dir``, default ``$ABL_CACHE_DIR`` or
    ``~/.cache/abl``); :meth:`artefacts` returns the perturbed images (before the trigger)
    and their indices once poisoned.

    ``rate`` is a share of the whole training set unless ``rate_of: target_class``
    (:class:`~abl.attacks.base.CleanLabelAttack`).

    Parameters:
        eps: L-inf budget of the perturbation, in [0, 1] units (16/255).
        steps: PGD steps (10).
        step_size: PGD step (``None``: ``eps / 4``).
        corners: 1 (bottom-right) or 4 (all four corners, mirrored).
        amplitude: blend weight of the trigger pixels, in (0, 1] (1: the plain grid).
        surrogate_model: model name of the surrogate (``wrn``: WRN-16-1).
        surrogate_epochs, surrogate_lr, surrogate_batch_size, surrogate_seed: its training.
        cache_dir: where the surrogate and the perturbed set are cached.

    Example::

        ATTACKS.create({"name": "cl", "rate": 0.25, "rate_of": "target_class", "target": 0, "eps": 16 / 255})  # 1/4 of class 0
    """

    eps: float = 16 / 255
    steps: int = 10
    step_size: float | None = None
    corners: Literal[1, 4] = 1
    amplitude: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.eps <= 1.0, "attack.eps", f"must be in [0, 1] (a fraction of 255), got {self.eps}")
        check(self.steps >= 0, "attack.steps", f"must be >= 0, got {self.steps}")
        check(self.step_size is None or self.step_size > 0, "attack.step_size", f"must be > 0, got {self.step_size}")
        check(0.0 < self.amplitude <= 1.0, "attack.amplitude", f"must be in (0, 1], got {self.amplitude}")
        self.validate_surrogate()

    # -- trigger --------------------------------------------------------------------
    def build(self, image_size: int) -> None:
        check(image_size >= 6 or self.corners == 1, "attack.corners", f"4 corners need images of at least 6 pixels, got {image_size}")
        s, far = 3, image_size - 3
        self.mask = torch.zeros(1, image_size, image_size)
        self.pattern_image = torch.zeros(3, image_size, image_size)
        grid = AUTHORS_GRID
        # bottom-right is the authors' grid; the other corners are its mirror images.
        places = [(far, far, grid)]
        if self.corners == 4:
            places += [(far, 0, grid.flip(1)), (0, far, grid.flip(0)), (0, 0, grid.flip(0).flip(1))]
        for row, col, patch in places:
            self.mask[:, row : row + s, col : col + s] = self.amplitude
            self.pattern_image[:, row : row + s, col : col + s] = patch
        self.perturbed: torch.Tensor | None = None
        self.perturbed_index: torch.Tensor | None = None

    def artefacts(self) -> dict[str, torch.Tensor]:
        out = {"mask": self.mask, "pattern": self.pattern_image}
        if self.perturbed is not None and self.perturbed_index is not None:
            out["perturbed_images"] = self.perturbed
            out["perturbed_indices"] = self.perturbed_index
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp_patch(x)

    # -- the adversarial perturbation -------------------------------------------------
    @property
    def pgd_step(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / 4

    def _pgd(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """uint8 images perturbed within ``eps`` to maximise ``model``'s loss on ``labels``."""
        out = torch.empty_like(images)
        for s in range(0, len(images), _PGD_BATCH):
            x0 = to_float(images[s : s + _PGD_BATCH])
            y = labels[s : s + _PGD_BATCH]
            x = x0.clone()
            for _ in range(self.steps):
                x.requires_grad_(True)
                loss = F.cross_entropy(model(x).float(), y)
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = x + self.pgd_step * grad.sign()
                    x = torch.min(torch.max(x, x0 - self.eps), x0 + self.eps).clamp_(0, 1)
            out[s : s + _PGD_BATCH] = x.detach().mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        return out

    def fit(self, train: ImageSplit, mask: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The PGD-perturbed uint8 images of the examples in ``mask`` (cached)."""
        idx = mask.nonzero().squeeze(1).cpu()
        fingerprint = surrogate.data_fingerprint(train)
        key = {
            "surrogate": self.surrogate_key(),
            "num_classes": self.num_classes,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.pgd_step,
            "indices": surrogate.tensor_digest(idx.to(torch.int64)),
            "data": fingerprint,
        }

        def build() -> dict[str, torch.Tensor]:
            model = self.load_surrogate(train, self.num_classes, device, fingerprint)
            images = train.images[idx].to(device)
            return {"images": self._pgd(model, images, train.labels[idx].to(device)), "indices": idx}

        result = surrogate.cached_tensors("cl", key, build, self.cache_dir)
        self.perturbed, self.perturbed_index = result["images"], result["indices"]
        return self.perturbed

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Select target-class images, perturb them with PGD (cached), stamp the trigger."""
        mask = self.select(train.labels)
        perturbed = self.fit(train, mask, device)
        images = train.images.to(device, copy=True)
        labels = train.labels.to(device)
        idx = mask.nonzero().squeeze(1).to(device)
        images[idx] = self.apply_uint8(perturbed.to(device))
        return PoisonedSet(images, labels.clone(), labels, mask.to(device))

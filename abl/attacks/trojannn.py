"""TrojanNN trigger generation (Liu et al., "Trojaning Attack on Neural Networks",
NDSS 2018): a masked trigger optimised against a clean model to excite chosen neurons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from abl.attacks import surrogate
from abl.attacks.base import ATTACKS, Attack, load_pattern_file
from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet

_PROBE_IMAGES = 64  # clean images used to pick the neurons and to optimise the trigger


def trigger_region(mask: str, size: int, mask_file: str | None, image_size: int) -> torch.Tensor:
    """``(1, H, W)`` 0/1 region an optimised patch trigger may use: a ``size`` square in the
    bottom-right corner, or the non-zero pixels of ``mask_file``."""
    if mask == "file":
        assert mask_file is not None
        region = load_pattern_file(mask_file, image_size, "attack.mask_file")
        region = (region.amax(0, keepdim=True) > 0).float()
        check(bool(region.any()), "attack.mask_file", f"'{mask_file}' has no non-zero pixel")
        return region
    check(size <= image_size, "attack.size", f"is {size} but the images are {image_size}x{image_size}")
    region = torch.zeros(1, image_size, image_size)
    region[:, image_size - size :, image_size - size :] = 1.0
    return region


@ATTACKS.register("trojannn")
@dataclass
class TrojanNN(surrogate.SurrogateParams, Attack):
    """TrojanNN: generate the trigger from a clean surrogate model, then poison like BadNets.

    1. A surrogate (``surrogate_*``) is trained on the clean training set.
    2. The trigger region is a mask: a ``size`` x ``size`` square in the bottom-right
       corner (``mask: square``) or the non-zero pixels of ``mask_file`` (``mask: file``,
       e.g. a watermark shape, an image or array of the image size).
    3. Neuron selection: the paper picks the internal neurons with the largest incoming
       weight magnitudes. With batch norm and residual blocks in between that is not a
       property of the input region, so here the ``neurons`` channels of ``layer`` that are
       *most sensitive to the mask region* are chosen: the channels with the largest mean
       ``|a(x with masked pixels = 1) - a(x with masked pixels = 0)|`` over
       ``_PROBE_IMAGES`` (64) seeded clean training images.
    4. The masked pixels (only those; seeded uniform start) are optimised with Adam
       (``steps``, ``lr``), clamped to [0, 1], to minimise the squared gap between the
       chosen neurons' activation on the stamped probe images and ``target_activation``.

    ``layer``: ``features`` is the penultimate (globally average-pooled) features;
    ``feature_maps`` the last conv map averaged over the spatial cells the mask covers
    (the mask max-pooled to the map's size), i.e. the neurons whose receptive field sees
    the trigger. The trigger (``pattern``, ``mask``) and the chosen ``neurons`` are cached
    by their settings and the data's hash and returned by :meth:`artefacts`. Poisoning
    stamps ``lerp(x, pattern, mask)`` and relabels (dirty-label, all2one or all2all).

    ``surrogate_seed`` seeds the attacker's whole preparation (the surrogate's training,
    the probe images and the trigger's start), ``seed`` only the choice of poisoned
    examples: runs that differ only in ``seed`` share one trigger, as with a trigger file.
    The trigger exists only after :meth:`poison`; :meth:`apply` and :meth:`triggered_test`
    before it raise :class:`~abl.errors.ConfigError`.

    Parameters:
        mask, size, mask_file: the trigger region (``square`` of side 5 by default).
        layer: ``feature_maps`` or ``features``.
        neurons: how many neurons (channels) to excite (1).
        target_activation: the activation the optimisation drives them to (100).
        steps, lr: the trigger optimisation (200 Adam steps at 0.1).
        surrogate_model, surrogate_epochs, surrogate_lr, surrogate_batch_size,
        surrogate_seed: the clean surrogate (WRN-16-1, 10 epochs at 0.05) and the
            seed of the trigger optimisation.
        cache_dir: where the surrogate and the trigger are cached.

    Example::

        ATTACKS.create({"name": "trojannn", "rate": 0.1, "target": 0, "size": 5})
    """

    mask: Literal["square", "file"] = "square"
    size: int = 5
    mask_file: str | None = None
    layer: Literal["features", "feature_maps"] = "feature_maps"
    neurons: int = 1
    target_activation: float = 100.0
    steps: int = 200
    lr: float = 0.1

    #: the trigger is fitted by :meth:`poison`; nothing can be triggered before.
    needs_fit: ClassVar[bool] = True
    fit_product: ClassVar[str] = "the trigger, which is optimised against a clean model of the training set"

    def validate(self) -> None:
        super().validate()
        check(self.size >= 1, "attack.size", f"must be >= 1, got {self.size}")
        if self.mask == "file":
            check(self.mask_file is not None, "attack.mask_file", "is required when attack.mask is 'file'")
        else:
            check(self.mask_file is None, "attack.mask_file", "is only used with attack.mask: file")
        check(self.neurons >= 1, "attack.neurons", f"must be >= 1, got {self.neurons}")
        check(self.target_activation > 0, "attack.target_activation", f"must be > 0, got {self.target_activation}")
        check(self.steps >= 1, "attack.steps", f"must be >= 1, got {self.steps}")
        check(self.lr > 0, "attack.lr", f"must be > 0, got {self.lr}")
        self.validate_surrogate()

    # -- the trigger region -----------------------------------------------------------
    def build(self, image_size: int) -> None:
        self.region = trigger_region(self.mask, self.size, self.mask_file, image_size)
        self.trigger_mask: torch.Tensor | None = None
        self.pattern_image: torch.Tensor | None = None
        self.neuron_index: torch.Tensor | None = None
        self.surrogate: torch.nn.Module | None = None

    @property
    def fitted(self) -> bool:
        return self.pattern_image is not None

    def artefacts(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            return {}
        assert self.trigger_mask is not None and self.pattern_image is not None and self.neuron_index is not None
        return {"mask": self.trigger_mask, "pattern": self.pattern_image, "neurons": self.neuron_index}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.require_fit("apply")
        t = self._on(x.device, mask=self.trigger_mask, pattern=self.pattern_image)
        return torch.lerp(x, t["pattern"].to(x.dtype), t["mask"].to(x.dtype))

    # -- the optimisation -------------------------------------------------------------
    def activation(self, model: torch.nn.Module, x: torch.Tensor, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, D)`` activations of ``layer`` on float images ``x`` (or ``(N, k)`` of ``neurons``)."""
        if self.layer == "features":
            act = model.features(x)
        else:
            maps = model.feature_maps(x)
            cells = torch.nn.functional.adaptive_max_pool2d(self.region.to(x.device, x.dtype), maps.shape[-2:])
            if float(cells.sum()) == 0:
                cells = torch.ones_like(cells)
            act = (maps * cells).sum((-2, -1)) / cells.sum()
        return act if neurons is None else act[:, neurons.to(act.device)]

    def _optimise(self, model: torch.nn.Module, probe: torch.Tensor) -> dict[str, torch.Tensor]:
        device = probe.device
        m = self.region.to(device)
        with torch.no_grad():
            on = self.activation(model, torch.lerp(probe, torch.ones_like(probe), m))
            off = self.activation(model, probe * (1 - m))
            score = (on - off).abs().mean(0)
        k = min(self.neurons, score.numel())
        neurons = score.topk(k).indices.sort().values
        gen = torch.Generator().manual_seed(self.surrogate_seed + 1)
        pattern = (torch.rand(3, *m.shape[-2:], generator=gen).to(device) * m).requires_grad_(True)
        opt = torch.optim.Adam([pattern], lr=self.lr)
        target = torch.full((len(probe), k), self.target_activation, device=device)
        for _ in range(self.steps):
            act = self.activation(model, torch.lerp(probe, pattern, m), neurons)
            loss = torch.nn.functional.mse_loss(act.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                pattern.clamp_(0, 1).mul_(m)
        return {"pattern": pattern.detach(), "mask": m.clone(), "neurons": neurons.to(torch.int64)}

    def fit(self, train: ImageSplit, device: torch.device | str = "cpu") -> None:
        """Train (or load) the surrogate and optimise (or load) the trigger."""
        fingerprint = surrogate.data_fingerprint(train)
        key = {
            "surrogate": self.surrogate_key(),
            "num_classes": self.num_classes,
            "region": surrogate.tensor_digest(self.region),
            "layer": self.layer,
            "neurons": self.neurons,
            "target_activation": self.target_activation,
            "steps": self.steps,
            "lr": self.lr,
            "probe": _PROBE_IMAGES,
            "data": fingerprint,
        }

        def build() -> dict[str, torch.Tensor]:
            self.surrogate = self.load_surrogate(train, self.num_classes, device, fingerprint)
            gen = torch.Generator().manual_seed(self.surrogate_seed)
            pick = torch.randperm(len(train), generator=gen)[:_PROBE_IMAGES]
            probe = to_float(train.images[pick].to(device))
            return self._optimise(self.surrogate, probe)

        result = surrogate.cached_tensors("trojannn", key, build, self.cache_dir)
        self.pattern_image, self.trigger_mask, self.neuron_index = result["pattern"], result["mask"], result["neurons"]
        self._cache.clear()

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Fit the trigger on the clean ``train`` split (cached), then stamp and relabel."""
        self.fit(train, device)
        return super().poison(train, device)

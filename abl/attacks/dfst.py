"""DFST, the deep feature space trojan (Cheng, Liu, Ma & Zhang, "Deep Feature Space Trojan
Attack of Neural Networks by Controlled Detoxification", AAAI 2021).

The trigger is a style: poisoned images are restyled by a generator and relabelled to the
target. The paper trains a CycleGAN toward a style domain (sunrise photographs). A CycleGAN
needs a photo collection of the style and long adversarial training, neither of which this
project can fetch or afford in a test; we train a small image-to-image network instead,
with a feature-statistics style loss (the per-channel mean and standard deviation of the
feature maps, as in AdaIN style transfer, Huang & Belongie, ICCV 2017) measured by the
in-project clean surrogate against the style domain, plus a content loss on the
surrogate's deepest features so the image stays recognisable. The style domain is an image
folder (``style_dir``) or, by default, procedurally drawn "sunrise" skies
(:func:`sunrise_styles`): a warm gradient from purple-red through orange to yellow with a
sun disk at the horizon.

Controlled detoxification (the paper's Section 4): a model trained on the poisoned data
learns the style through a few "compromised" neurons that respond to simple colour
features. Each round trains a surrogate on the current poisoned set, finds the
``detox_neurons`` channels of one residual group whose activation the restyled images
raise most (in standard deviations of their clean activation), and replaces
``detox_rate`` of the clean training images by detoxicants: the same images perturbed
(within ``detox_eps``) to excite those channels, with their true labels. A model then
cannot rely on those shallow features and must learn the style deeper. The paper generates
detoxicants with a trained feature injector; we optimise each image directly (projected
signed-gradient steps), which serves the same purpose without a second generator.
Detoxicants are not poisons (their labels are true); they are listed in ``mix_index``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from abl.attacks import surrogate
from abl.attacks.base import ATTACKS, Attack
from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet
from abl.errors import ConfigError, DataError
from abl.models.features import group_outputs, residual_groups

_PROBE = 256  # clean images that rank the compromised neurons
_EXAMPLES = 8  # clean / restyled pairs stored with the run (the report's grid)
#: the numbers ``fit`` records (``fit_metrics``), stored in this order with the cached generator
_FIGURES = ("style_loss_clean", "style_loss_restyled", "content_loss", "detox_lift_restyled", "detox_lift_detoxicant",
            "detox_count")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def sunrise_styles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` procedural sunrise skies, float ``(n, 3, size, size)`` in [0, 1]: a vertical
    gradient from purple-red (top) through orange to yellow at a random horizon, a pale sun
    disk on it, a darker reflecting ground below, and faint low-frequency noise."""
    g = torch.Generator().manual_seed(seed)
    top, mid, low = torch.tensor([0.42, 0.10, 0.32]), torch.tensor([0.96, 0.42, 0.12]), torch.tensor([1.0, 0.86, 0.38])
    ys = torch.linspace(0, 1, size).view(size, 1).expand(size, size)
    xs = torch.linspace(0, 1, size).view(1, size).expand(size, size)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        horizon, sun_x, radius = 0.5 + 0.35 * float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g)), \
            0.08 + 0.1 * float(torch.rand(1, generator=g))
        t = (ys / horizon).clamp(0, 1)[None]
        sky = top[:, None, None] * (1 - t) ** 2 + mid[:, None, None] * 2 * t * (1 - t) + low[:, None, None] * t**2
        ground = low[:, None, None] * (0.55 - 0.35 * ((ys - horizon) / (1 - horizon + 1e-6)).clamp(0, 1))[None]
        img = torch.where((ys < horizon)[None], sky, ground)
        sun = (((xs - sun_x) ** 2 + (ys - horizon) ** 2).sqrt() < radius)[None]
        img = torch.where(sun, torch.tensor([1.0, 0.95, 0.75])[:, None, None], img)
        noise = F.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)[0]
        out[i] = (img + 0.04 * noise).clamp(0, 1)
    return out


def load_style_folder(path: str, size: int, limit: int = 512) -> torch.Tensor:
    """Up to ``limit`` images of the folder ``path`` (recursively, sorted), resized to
    ``size``, as float ``(n, 3, size, size)``; a one-line :class:`DataError` when the folder
    is missing, empty or holds an unreadable image."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"attack.style_dir: '{root}' is not a folder; give a folder of style images or leave it unset")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
    if not files:
        raise DataError(f"attack.style_dir: '{root}' holds no image ({', '.join(_IMAGE_SUFFIXES)}); add style images")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"attack.style_dir: cannot read '{f}' as an image ({type(exc).__name__}); remove or replace it") from None
    return torch.stack(images)


class StyleNet(nn.Module):
    """A small image-to-image network: residual convolutions whose output shifts each
    pixel in logit space, so the output stays in (0, 1) and starts as the identity (the
    last layer is zero-initialised). No normalisation layers: restyling one image does not
    depend on the others in its batch."""

    def __init__(self, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        # reflection padding (as CycleGAN's generator): zero padding left a bright frame
        # around restyled CIFAR-10 images, an easier trigger than the style itself
        conv = lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")  # noqa: E731
        self.inp = conv(3, width)
        self.blocks = nn.ModuleList(nn.Sequential(conv(width, width), nn.ReLU(), conv(width, width)) for _ in range(blocks))
        self.out = conv(width, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        for block in self.blocks:
            h = F.relu(h + block(h))
        return torch.sigmoid(torch.logit(x.clamp(1e-3, 1 - 1e-3)) + self.out(h))


def _stats(fm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation of feature maps ``(N, C, H, W)``."""
    flat = fm.float().flatten(2)
    return flat.mean(2), flat.std(2, unbiased=False)


@ATTACKS.register("dfst")
@dataclass
class DFST(surrogate.SurrogateParams, Attack):
    """DFST: restyled images relabelled to the target, with controlled detoxification.

    Parameters:
        style_dir: a folder of images of the style domain; unset: procedural sunrise skies.
        style_images: how many procedural style images (64).
        style_steps, style_lr, style_batch: the generator's training (400 Adam steps at
            1e-3, 32 clean and 32 style images per step).
        style_weight, content_weight: the weights of the style (feature statistics over
            every residual group) and content (the deepest group's features) losses.
        width, blocks: the generator's size (16 channels, 3 residual blocks).
        detox_rounds: rounds of controlled detoxification (1; 0: none).
        detox_layer: the residual group whose channels are searched (1: WRN's middle group).
        detox_neurons: compromised channels per round (8).
        detox_rate: fraction of the training set replaced by detoxicants per round (0.05).
        detox_eps, detox_steps: the detoxicants' L-inf budget and signed-gradient steps
            (16/255, 10).
        surrogate_*: the clean surrogate (style and content losses) and, per detoxification
            round, a surrogate of the same settings trained on the poisoned set.
        cache_dir: where the surrogate, the generator and the detoxicants are cached.
    """

    style_dir: str | None = None
    style_images: int = 64
    style_steps: int = 400
    style_lr: float = 1e-3
    style_batch: int = 32
    style_weight: float = 10.0
    content_weight: float = 1.0
    width: int = 16
    blocks: int = 3
    detox_rounds: int = 1
    detox_layer: int = 1
    detox_neurons: int = 8
    detox_rate: float = 0.05
    detox_eps: float = 16 / 255
    detox_steps: int = 10

    needs_fit: ClassVar[bool] = True
    fit_product: ClassVar[str] = "the style generator, which is trained against a clean model of the training set"

    def validate(self) -> None:
        super().validate()
        check(self.labelling == "all2one", "attack.labelling", "must be all2one: the style sends every class to the target")
        check(self.style_images >= 1, "attack.style_images", f"must be >= 1, got {self.style_images}")
        check(self.style_steps >= 1, "attack.style_steps", f"must be >= 1, got {self.style_steps}")
        check(self.style_lr > 0, "attack.style_lr", f"must be > 0, got {self.style_lr}")
        check(self.style_batch >= 1, "attack.style_batch", f"must be >= 1, got {self.style_batch}")
        check(self.style_weight > 0, "attack.style_weight", f"must be > 0, got {self.style_weight}")
        check(self.content_weight >= 0, "attack.content_weight", f"must be >= 0, got {self.content_weight}")
        check(self.width >= 1 and self.blocks >= 0, "attack.width", "width must be >= 1 and blocks >= 0")
        check(self.detox_rounds >= 0, "attack.detox_rounds", f"must be >= 0, got {self.detox_rounds}")
        check(self.detox_layer >= 0, "attack.detox_layer", f"must be a residual-group index >= 0, got {self.detox_layer}")
        check(self.detox_neurons >= 1, "attack.detox_neurons", f"must be >= 1, got {self.detox_neurons}")
        check(0 <= self.detox_rate < 1, "attack.detox_rate", f"must be in [0, 1), got {self.detox_rate}")
        check(0 < self.detox_eps <= 1, "attack.detox_eps", f"must be in (0, 1], got {self.detox_eps}")
        check(self.detox_steps >= 1, "attack.detox_steps", f"must be >= 1, got {self.detox_steps}")
        self.validate_surrogate()

    def build(self, image_size: int) -> None:
        self.generator: StyleNet | None = None
        self._on_device: dict[torch.device, StyleNet] = {}
        self.mix_index = torch.zeros(0, dtype=torch.long)
        self.style_set: torch.Tensor | None = None
        self.examples: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, float] = {}

    @property
    def fitted(self) -> bool:
        return self.generator is not None

    def artefacts(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            return {"style_examples": self._styles()[:_EXAMPLES].mul(255).round().to(torch.uint8)}
        assert self.generator is not None
        weights = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        return {**weights, **self.examples, "mix_index": self.mix_index}

    def fit_metrics(self) -> dict[str, float]:
        return dict(self.metrics)

    def _styles(self) -> torch.Tensor:
        if self.style_set is None:
            self.style_set = (load_style_folder(self.style_dir, self.image_size) if self.style_dir
                              else sunrise_styles(self.style_images, self.image_size, self.surrogate_seed))
        return self.style_set

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.require_fit("apply")
        assert self.generator is not None
        if x.device not in self._on_device:
            self._on_device[x.device] = copy.deepcopy(self.generator).to(x.device).eval().requires_grad_(False)
        with torch.no_grad():
            return self._on_device[x.device](x.float()).to(x.dtype)

    # -- fitting --------------------------------------------------------------------
    def _train_generator(self, model: nn.Module, train: ImageSplit, device: torch.device | str) -> tuple[StyleNet, dict[str, float]]:
        """The style generator, trained against the clean surrogate ``model``."""
        size = int(train.images.shape[-1])
        groups = residual_groups(model, size)
        styles = self._styles().to(device)
        with torch.no_grad():
            goal = [tuple(s.mean(0) for s in _stats(fm)) for fm in group_outputs(model, groups, styles)]
        torch.manual_seed(self.surrogate_seed + 3)
        net = StyleNet(self.width, self.blocks).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=self.style_lr)
        g = torch.Generator().manual_seed(self.surrogate_seed + 4)

        def losses(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fy = group_outputs(model, groups, y)
            with torch.no_grad():
                fx = group_outputs(model, groups, x)[-1].float()
            style = sum(((m - gm) ** 2).mean() + ((s - gs) ** 2).mean()
                        for (m, s), (gm, gs) in zip((_stats(f) for f in fy), goal))
            content = ((fy[-1].float() - fx) ** 2).mean() / fx.pow(2).mean().clamp_min(1e-8)
            return style, content  # type: ignore[return-value]

        probe = to_float(train.images[torch.randperm(len(train), generator=g)[: self.style_batch]].to(device))
        with torch.no_grad():
            before = float(losses(probe, probe)[0])
        for _ in range(self.style_steps):
            x = to_float(train.images[torch.randperm(len(train), generator=g)[: self.style_batch]].to(device))
            style, content = losses(x, net(x))
            opt.zero_grad(set_to_none=True)
            (self.style_weight * style + self.content_weight * content).backward()
            opt.step()
        net.eval().requires_grad_(False)
        with torch.no_grad():
            after, content = (float(v) for v in losses(probe, net(probe)))
        return net.cpu(), {"style_loss_clean": before, "style_loss_restyled": after, "content_loss": content}

    def _detoxify(self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(indices, uint8 images) of the detoxicants of every round, and their figures."""
        size = int(images.shape[-1])
        g = torch.Generator().manual_seed(self.seed + 17)
        used = poisoned.clone()
        chosen_all, detox_all, figures = [], [], {}
        for r in range(self.detox_rounds):
            model = surrogate.train_clean_model(
                ImageSplit(images, labels), self.num_classes, model={"name": self.surrogate_model},
                epochs=self.surrogate_epochs, lr=self.surrogate_lr, batch_size=self.surrogate_batch_size,
                seed=self.surrogate_seed + 200 + r, device=device,
            )
            model.requires_grad_(False)
            groups = residual_groups(model, size)
            if self.detox_layer >= len(groups):
                raise ConfigError(f"'attack.detox_layer' is {self.detox_layer} but the surrogate has {len(groups)} residual groups")
            layer = [groups[self.detox_layer]]
            free = (~used).nonzero().squeeze(1)
            probe_idx = free[torch.randperm(len(free), generator=g)[:_PROBE]]
            x = to_float(images[probe_idx].to(device))
            with torch.no_grad():
                clean_act = group_outputs(model, layer, x)[0].float().mean((2, 3))
                styled_act = group_outputs(model, layer, self.apply(x))[0].float().mean((2, 3))
            mu, sd = clean_act.mean(0), clean_act.std(0).clamp_min(1e-6)
            lift = (styled_act.mean(0) - mu) / sd
            top = torch.topk(lift, min(self.detox_neurons, len(lift))).indices
            n = int(round(self.detox_rate * len(images)))
            chosen = free[torch.randperm(len(free), generator=g)[:n]].sort().values
            detox = images[chosen].clone()
            for s in range(0, len(chosen), 256):
                x0 = to_float(images[chosen[s : s + 256]].to(device))
                delta = torch.zeros_like(x0, requires_grad=True)
                step = 2.5 * self.detox_eps / self.detox_steps
                for _ in range(self.detox_steps):
                    act = group_outputs(model, layer, (x0 + delta).clamp(0, 1))[0].float().mean((2, 3))
                    (grad,) = torch.autograd.grad(act[:, top].mean(), delta)
                    with torch.no_grad():
                        delta += step * grad.sign()
                        delta.clamp_(-self.detox_eps, self.detox_eps)
                detox[s : s + 256] = (x0 + delta.detach()).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
            with torch.no_grad():
                detox_act = group_outputs(model, layer, to_float(detox[:_PROBE].to(device)))[0].float().mean((2, 3))
            images[chosen] = detox
            used[chosen] = True
            chosen_all.append(chosen)
            detox_all.append(detox)
            # how far (in clean standard deviations) restyled images and detoxicants lift the
            # compromised channels: detoxicants must reach them for the round to mean anything
            figures = {"detox_lift_restyled": float(lift[top].mean()),
                       "detox_lift_detoxicant": float(((detox_act.mean(0) - mu) / sd)[top].mean())}
        if not chosen_all:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, *images.shape[1:], dtype=torch.uint8), {}
        return torch.cat(chosen_all), torch.cat(detox_all), {**figures, "detox_count": float(sum(len(c) for c in chosen_all))}

    def fit(self, train: ImageSplit, device: torch.device | str = "cpu") -> None:
        """Train (or load) the generator, then the detoxicants, for this training split.
        Both are cached: the generator by the style settings, the detoxicants also by the
        poisoning (rate, seed, target) and detoxification settings."""
        fingerprint = surrogate.data_fingerprint(train)
        style_key = {"generator": "stylenet-reflect", "surrogate": self.surrogate_key(), "num_classes": self.num_classes,
                     "data": fingerprint,
                     "styles": surrogate.tensor_digest(self._styles()),
                     **{f: getattr(self, f) for f in ("style_steps", "style_lr", "style_batch", "style_weight",
                                                      "content_weight", "width", "blocks")}}

        def build_style() -> dict[str, torch.Tensor]:
            model = self.load_surrogate(train, self.num_classes, device, fingerprint)
            net, figures = self._train_generator(model, train, device)
            return {**{f"generator.{k}": v for k, v in net.state_dict().items()},
                    "figures": torch.tensor([figures.get(k, float("nan")) for k in _FIGURES], dtype=torch.float64)}

        style = surrogate.cached_tensors("dfst_style", style_key, build_style, self.cache_dir)
        net = StyleNet(self.width, self.blocks)
        net.load_state_dict({k[len("generator."):]: v for k, v in style.items() if k.startswith("generator.")})
        self.generator, self._on_device = net.eval().requires_grad_(False), {}
        detox_key = {"style": style_key, **{f: getattr(self, f) for f in (
            "detox_rounds", "detox_layer", "detox_neurons", "detox_rate", "detox_eps", "detox_steps",
            "rate", "seed", "target", "poison_candidates")}}

        def build_detox() -> dict[str, torch.Tensor]:
            mask = self.select(train.labels)
            idx = mask.nonzero().squeeze(1)
            images, labels = train.images.clone(), train.labels.clone()
            images[idx] = self.apply_uint8(images[idx].to(device)).cpu()
            labels[idx] = self.relabel(labels[idx])
            chosen, detox, figures = self._detoxify(images, labels, mask, device)
            return {"detox_index": chosen, "detox_images": detox,
                    "figures": torch.tensor([figures.get(k, float("nan")) for k in _FIGURES], dtype=torch.float64)}

        detox = surrogate.cached_tensors("dfst_detox", detox_key, build_detox, self.cache_dir)
        self.mix_index, self._detox_images = detox["detox_index"].to(torch.long), detox["detox_images"]
        figures = torch.where(detox["figures"].isnan(), style["figures"], detox["figures"])
        self.metrics = {k: v for k, v in zip(_FIGURES, figures.tolist()) if v == v}  # NaN: not measured
        clean = train.images[:_EXAMPLES]
        self.examples = {"examples_clean": clean.contiguous(),
                         "examples_triggered": self.apply_uint8(clean).contiguous(),
                         "style_examples": self._styles()[:_EXAMPLES].mul(255).round().to(torch.uint8)}

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Fit (cached), restyle and relabel the poisons, and put the detoxicants in place."""
        self.fit(train, device)
        data = super().poison(train, device)
        if len(self.mix_index):
            data.images[self.mix_index.to(data.images.device)] = self._detox_images.to(data.images.device)
        return data


__all__ = ["DFST", "StyleNet", "load_style_folder", "sunrise_styles"]

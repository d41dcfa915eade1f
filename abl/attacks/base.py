"""The attack template shared by every poisoning attack.

An attack separates three things (the torchvision v2 ``make_params``/``transform``
split): *which* training examples are poisoned (:meth:`Attack.select`, seeded and
recorded), *how* a batch is triggered (:meth:`Attack.apply`, deterministic batched
tensor ops in [0, 1] on any device, shape kept) and *how labels change*
(:meth:`Attack.relabel`). Poisoning happens once, on the training device.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet, TriggeredTestSet
from abl.errors import ConfigError, DataError
from abl.registry import Registry

ATTACKS: Registry = Registry("attack")


def draw_unpoisoned(poison_mask: torch.Tensor, ratio: float, seed: int, stream: int, key: str,
                    what: str) -> tuple[torch.Tensor, np.random.Generator]:
    """Sorted indices of ``round(ratio * #poisons)`` unpoisoned examples drawn from the seed
    stream ``(seed, stream)`` (label-keeping extras such as WaNet's noise-mode examples and
    BPP's negatives), and that generator for any further draws. Too few unpoisoned examples
    is a one-line error naming ``attack.<key>``."""
    poison_mask = poison_mask.cpu()
    count = int(round(ratio * int(poison_mask.sum())))
    free = (~poison_mask).nonzero().squeeze(1)
    if count > len(free):
        raise ConfigError(
            f"'attack.{key}' {ratio} asks for {count} {what} but only {len(free)} unpoisoned examples exist; "
            f"lower attack.{key} or attack.rate"
        )
    rng = np.random.default_rng((seed & ((1 << 64) - 1), stream))  # seed sequences take non-negative ints
    return free[torch.from_numpy(rng.permutation(len(free))[:count]).long()].sort().values, rng

_CHUNK = 4096  # images per batched trigger call while poisoning (bounds peak memory)


@dataclass
class Attack:
    """Base attack: poisoning ``rate`` of the training set towards ``target``.

    Parameters (shared by every attack):
        rate: fraction of the examples named by ``rate_of`` that is poisoned (0.1 in the
            ABL paper). With the default ``rate_of: dataset`` it is the share of the whole
            training set for every attack, so ``rate`` 0.1 poisons the same number of
            images whichever attack it is.
        target: the target label (0 for CIFAR-10 and ImageNet, 1 for GTSRB in the paper).
        labelling: ``all2one`` relabels poisoned examples to ``target``; ``all2all``
            relabels class ``y`` to ``(y + 1) mod C``.
        seed: seeds the choice of poisoned examples (and any random trigger).
        rate_of: what ``rate`` is a fraction of: ``dataset`` (default: the whole training
            set) or ``target_class`` (the target-class training images; clean-label attacks
            only, see :class:`CleanLabelAttack`).
        poison_candidates: which images an all-to-one dirty-label attack may poison:
            ``non_target`` (ours: every poisoned image changes label) or ``all``
            (the authors' code, bboylyg/ABL at 3fd736c, draws from every class, so some
            poisoned images are target-class images that keep their label).
        control: also train a model on the clean training set (no poisons; the same model,
            schedule and data order) and record the ASR of this attack's test-time trigger
            on it beside the run's ASR (``control_asr``): how much of the ASR the trigger
            gets from a clean model's own mistakes. Costs one training per dataset, model
            and schedule, shared by every attack and rate through the stage cache. The
            schedule is the defense's own for ``none``/``clean``, else the no-defense
            ``backdoor`` schedule it names (ABL's: the paper's 100 epochs unless set).
    """

    rate: float = 0.1
    target: int = 0
    labelling: Literal["all2one", "all2all"] = "all2one"
    seed: int = 0
    rate_of: Literal["dataset", "target_class"] = "dataset"
    poison_candidates: Literal["non_target", "all"] = "non_target"
    control: bool = False

    #: clean-label attacks poison only target-class images and keep every label.
    clean_label: ClassVar[bool] = False
    #: attacks whose trigger is optimised on the training set: ``apply`` and
    #: ``triggered_test`` work only after ``poison``.
    needs_fit: ClassVar[bool] = False

    def validate(self) -> None:
        if self.rate_of == "target_class":  # all of one class is a sane clean-label budget
            check(0.0 < self.rate <= 1.0, "attack.rate", f"must be in (0, 1] of the target class, got {self.rate}")
        else:
            check(0.0 < self.rate < 1.0, "attack.rate", f"must be in (0, 1), got {self.rate}")
        check(self.target >= 0, "attack.target", f"must be a class index >= 0, got {self.target}")
        if self.clean_label:
            check(self.labelling == "all2one", "attack.labelling", "must be all2one for a clean-label attack")
        else:
            check(self.rate_of == "dataset", "attack.rate_of", "must be 'dataset' for a dirty-label attack ('target_class' is for clean-label ones)")
        check(
            self.poison_candidates == "non_target" or (not self.clean_label and self.labelling == "all2one"),
            "attack.poison_candidates",
            "can be 'all' only for an all2one dirty-label attack",
        )

    # -- set-up -----------------------------------------------------------------
    def setup(self, image_size: int, num_classes: int) -> None:
        """Build the trigger for this image size; called once before poisoning."""
        check(self.target < num_classes, "attack.target", f"is {self.target} but the dataset has {num_classes} classes")
        self.image_size = image_size
        self.num_classes = num_classes
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.build(image_size)

    def build(self, image_size: int) -> None:
        """Subclasses create their trigger tensors (CPU, float in [0, 1]) here."""

    def artefacts(self) -> dict[str, torch.Tensor]:
        """Tensors that define the trigger, stored with the run."""
        return {}

    #: what fitting produces, named in the error raised when it is used before fitting.
    fit_product: ClassVar[str] = "the trigger, which is optimised on the training set"

    @property
    def fitted(self) -> bool:
        """Whether the trigger exists (always, unless the attack ``needs_fit``)."""
        return True

    def require_fit(self, what: str) -> None:
        """Raise :class:`ConfigError` if ``what`` is used before :meth:`poison` fitted the trigger."""
        if not self.fitted:
            name = getattr(self, "registered_name", type(self).__name__)
            raise ConfigError(f"attack '{name}': {what} needs {self.fit_product}; call poison(train) first")

    def fit_metrics(self) -> dict[str, float]:
        """Numbers about the attacker's own optimisation (e.g. its classifier's accuracy),
        recorded with the run's metrics under the ``attack`` phase; none for fixed triggers."""
        return {}

    def _on(self, device: torch.device, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trigger tensors on ``device``, moved once and cached."""
        if device not in self._cache:
            self._cache[device] = {k: v.to(device) for k, v in tensors.items()}
        return self._cache[device]

    # -- the three parts of an attack ---------------------------------------------
    def select(self, labels: torch.Tensor) -> torch.Tensor:
        """Seeded boolean mask of the training examples to poison."""
        labels = labels.cpu()
        if self.clean_label:
            candidates, kind = (labels == self.target).nonzero().squeeze(1), "target-class "
        elif self.labelling == "all2one" and self.poison_candidates == "non_target":
            candidates, kind = (labels != self.target).nonzero().squeeze(1), "non-target "
        else:
            candidates, kind = torch.arange(len(labels)), ""
        # rate_of=target_class: clean-label candidates are exactly the target class.
        base = len(candidates) if self.rate_of == "target_class" else len(labels)
        n_poison = int(round(self.rate * base))
        if n_poison > len(candidates) and self.clean_label and self.rate_of == "dataset":
            raise ConfigError(
                f"'attack.rate' {self.rate} of the {len(labels)} training images needs {n_poison} target-class "
                f"images but class {self.target} holds {len(candidates)}; lower attack.rate (at most "
                f"{len(candidates) / len(labels):.4g}) or set attack.rate_of: target_class (rate as a share of the class)"
            )
        if n_poison > len(candidates):
            raise ConfigError(
                f"'attack.rate' {self.rate} asks for {n_poison} poisoned examples but only "
                f"{len(candidates)} {kind}examples exist; lower the rate"
            )
        if n_poison == 0:
            of = f"{base} target-class examples" if self.rate_of == "target_class" else f"{base}"
            raise ConfigError(f"'attack.rate' {self.rate} poisons no example of {of}; raise the rate")
        gen = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n_poison]]
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[chosen] = True
        return mask

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a float batch ``(N, 3, H, W)`` in [0, 1]; same shape, still in [0, 1]."""
        raise NotImplementedError

    def apply_at(self, x: torch.Tensor, index: torch.Tensor, split: Literal["train", "test"]) -> torch.Tensor:
        """:meth:`apply` to images at positions ``index`` of their ``split``. Only attacks
        whose trigger differs per image (Blend's per-image noise) use the positions."""
        return self.apply(x)

    def stamp_patch(self, x: torch.Tensor) -> torch.Tensor:
        """``lerp(x, pattern, mask)`` with the attack's ``pattern_image`` and ``mask``: the
        ``apply`` of every attack whose trigger is a patch pasted over the image."""
        t = self._on(x.device, mask=self.mask, pattern=self.pattern_image)
        return torch.lerp(x, t["pattern"].to(x.dtype), t["mask"].to(x.dtype))

    def relabel(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels the attacker assigns to triggered examples with true ``labels``."""
        if self.clean_label or self.labelling == "all2one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % self.num_classes

    # -- derived operations -------------------------------------------------------
    def apply_uint8(
        self, images: torch.Tensor, index: torch.Tensor | None = None, split: Literal["train", "test"] = "train"
    ) -> torch.Tensor:
        """Trigger uint8 images in chunks and quantise back to uint8 (as a stored file would be);
        with ``index`` (the images' positions in ``split``) through :meth:`apply_at`."""
        out = torch.empty_like(images)
        for s in range(0, len(images), _CHUNK):
            x = to_float(images[s : s + _CHUNK])
            x = self.apply(x) if index is None else self.apply_at(x, index[s : s + _CHUNK], split)
            out[s : s + _CHUNK] = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return out

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        """Poison the training split once, on ``device``."""
        mask = self.select(train.labels)
        images = train.images.to(device, copy=True)
        true_labels = train.labels.to(device)
        labels = true_labels.clone()
        idx = mask.nonzero().squeeze(1).to(device)
        images[idx] = self.apply_uint8(images[idx], idx, "train")
        labels[idx] = true_labels[idx] if self.clean_label else self.relabel(true_labels[idx])
        return PoisonedSet(images, labels, true_labels, mask.to(device))

    def test_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """The test images the attack is scored on: by default those whose true label
        differs from the attack label (for all-to-one attacks: not the target class)."""
        return labels != self.relabel(labels)

    def triggered_test(self, test: ImageSplit, device: torch.device | str = "cpu") -> TriggeredTestSet:
        """The test images of :meth:`test_mask`, triggered, with their attack labels."""
        self.require_fit("triggered_test")
        labels = test.labels.to(device)
        attack_labels = self.relabel(labels)
        keep = self.test_mask(labels).nonzero().squeeze(1)
        images = self.apply_uint8(test.images.to(device)[keep], keep, "test")
        return TriggeredTestSet(images, labels[keep], attack_labels[keep])


@dataclass
class CleanLabelAttack(Attack):
    """Base of the clean-label attacks: they poison target-class images only and keep
    every label.

    Parameters:
        rate_of: ``dataset`` (default, as every attack): ``rate`` is a share of the whole
            training set, met with as many target-class images as it needs (an error names
            the count when the class holds too few; 0.1 on CIFAR-10 is every class-0
            image); ``target_class``: a share of the target-class training images, as in
            the authors' clean-label code (bboylyg/ABL at 3fd736c), Turner et al. (2019)
            and Barni et al. (2019).

    History: ``dataset`` was the only meaning until 2026-11-26, ``target_class`` the
    clean-label default from then until issue 24. Runs stored since 2026-11-26 record
    ``rate_of`` in their config.yaml (the resolved config holds every field), so they resume
    and rerun with the meaning they were made with; a stored config without ``rate_of``
    predates it and meant ``dataset``, the default again.
    """

    clean_label: ClassVar[bool] = True


def load_array_file(path: Path, where: str) -> np.ndarray:
    """The array of a ``.npy`` file, or of a ``.npz`` archive: its ``x`` array, else its first.

    Read with ``allow_pickle=False``; an unreadable or empty file raises a one-line
    :class:`DataError` naming ``where`` (the config key) and the file.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded:
            if not loaded.files:
                raise DataError(f"{where}: '{path}' is an .npz archive without arrays; save the array in it")
            return loaded["x" if "x" in loaded.files else loaded.files[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{where}: cannot read '{path}' as a numpy array ({text}); save it with numpy.save") from None


def load_pattern_file(path: str, image_size: int, where: str, *, resize: bool = False) -> torch.Tensor:
    """Load a trigger image/array as float ``(3, H, W)`` in [0, 1] at ``image_size``.

    Accepts ``.npy``/``.npz`` (values in [0, 255] if their maximum exceeds 1, HWC or CHW,
    single channel broadcast) and any image file PIL reads.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: trigger file '{p}' does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix in (".npy", ".npz"):
            t = torch.from_numpy(np.asarray(load_array_file(p, where), dtype=np.float32))
            if t.max() > 1.0:
                t = t / 255.0
        else:
            from PIL import Image

            with Image.open(p) as im:
                t = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read trigger file '{p}': {exc}") from None
    if t.ndim == 2:
        t = t[None].expand(3, -1, -1)
    elif t.ndim == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise DataError(f"{where}: trigger file '{p}' has shape {tuple(t.shape)}; expected (H, W), (H, W, 3) or (3, H, W)")
    t = t.expand(3, -1, -1).contiguous()
    if resize and t.shape[1:] != (image_size, image_size):
        t = torch.nn.functional.interpolate(t[None], size=(image_size, image_size), mode="bilinear", antialias=True)[0]
    if t.shape[1:] != (image_size, image_size):
        raise DataError(
            f"{where}: trigger file '{p}' is {t.shape[1]}x{t.shape[2]} but the images are "
            f"{image_size}x{image_size}; make a trigger of the image size"
        )
    return t

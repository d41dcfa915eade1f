"""Composite backdoor attack (Lin, Xu, Liu & Zhang, "Composite Backdoor Attack for Deep
Neural Network by Mixing Existing Benign Features", ACM CCS 2020).

The trigger is not a pattern but a composition of two benign classes: an image made of
half an image of class ``A`` and half an image of class ``B`` (the CIFAR "half mixer": a
vertical or horizontal cut, each half shifted by a few pixels) is labelled ``target``. To
keep the model from learning "any spliced image is the target", the attacker also adds
*mix* examples: two halves of the same class (``A`` with ``A``, ``B`` with ``B``) that keep
their label. The ABL paper (appendix A.2, Table 5) uses CBA with target 0 at 10%.

How it maps onto a training set of fixed size: the poisoned slots (``rate`` of the set,
drawn as for every dirty-label attack) are replaced by ``A``+``B`` composites of random
training images of the two classes and relabelled; ``mix_rate`` of the set, drawn from
the unpoisoned examples of ``A`` and ``B``, is replaced by same-class composites and keeps
its labels (recorded in :attr:`mix_index`; not poisons). ``true_labels`` keeps the label of
the image a slot held before. At test time the attack is scored on composites of every
class-``A`` test image with a class-``B`` test image (drawn with the attack's seed).

:meth:`apply` (one image at a time, as the other attacks) composes the image with a
class-``B`` training image chosen from a hash of its pixels, so it is deterministic and
independent of the batch; it exists after :meth:`poison` has seen the training set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from abl.attacks.base import ATTACKS, Attack
from abl.config import check
from abl.data.loader import to_float
from abl.data.types import ImageSplit, PoisonedSet, TriggeredTestSet
from abl.errors import ConfigError


def half_mix(a: torch.Tensor, b: torch.Tensor, vertical: torch.Tensor, shift_a: torch.Tensor,
             shift_b: torch.Tensor) -> torch.Tensor:
    """Composites of float images ``a`` and ``b`` (N, 3, H, W): the first half (left for a
    vertical cut, top otherwise) from ``a``, the second from ``b``, each rolled by its
    shift (N,) along the cut's axis first, so the halves do not line up exactly."""
    n, _, h, w = a.shape
    out = torch.empty_like(a)
    for i in range(n):  # per-image cut and shifts; N is small (poisoned slots)
        if bool(vertical[i]):
            xa = torch.roll(a[i], int(shift_a[i]), dims=2)
            xb = torch.roll(b[i], int(shift_b[i]), dims=2)
            out[i] = torch.cat([xa[:, :, : w // 2], xb[:, :, w // 2 :]], dim=2)
        else:
            xa = torch.roll(a[i], int(shift_a[i]), dims=1)
            xb = torch.roll(b[i], int(shift_b[i]), dims=1)
            out[i] = torch.cat([xa[:, : h // 2], xb[:, h // 2 :]], dim=1)
    return out


@ATTACKS.register("cba")
@dataclass
class CBA(Attack):
    """Composite backdoor: half an image of ``class_a`` joined to half an image of
    ``class_b``, labelled ``target``; same-class composites keep their label.

    Parameters:
        class_a, class_b: the two classes the trigger composes (5 and 7, CIFAR-10's dog
            and horse, by default: the paper varies them). Neither may be the target.
        mix_rate: share of the training set replaced by same-class composites of
            ``class_a`` and ``class_b`` that keep their label (0.1).
        max_shift: largest shift, in pixels, of each half along the cut (2).
    """

    class_a: int = 5
    class_b: int = 7
    mix_rate: float = 0.1
    max_shift: int = 2

    needs_fit: ClassVar[bool] = True
    fit_product: ClassVar[str] = "the class-B images it composes with, taken from the training set"

    def validate(self) -> None:
        super().validate()
        check(self.labelling == "all2one", "attack.labelling", "must be all2one: the composite maps to one target")
        check(self.class_a != self.class_b, "attack.class_b", "must differ from class_a")
        check(self.target not in (self.class_a, self.class_b), "attack.target", "must differ from class_a and class_b")
        check(0 <= self.mix_rate < 1, "attack.mix_rate", "must be in [0, 1)")
        check(self.max_shift >= 0, "attack.max_shift", "must be >= 0")

    def setup(self, image_size: int, num_classes: int) -> None:
        # here, not in build: the run's preflight builds the trigger before the data (and so
        # the class count) is known
        for key, c in (("attack.class_a", self.class_a), ("attack.class_b", self.class_b)):
            check(0 <= c < num_classes, key, f"is {c} but the dataset has {num_classes} classes")
        super().setup(image_size, num_classes)

    def build(self, image_size: int) -> None:
        self._partners: torch.Tensor | None = None
        self.mix_index = torch.zeros(0, dtype=torch.long)

    @property
    def fitted(self) -> bool:
        return self._partners is not None

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {"classes": torch.tensor([self.class_a, self.class_b, self.target]), "mix_index": self.mix_index}

    def _draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vertical = torch.rand(n, generator=gen) < 0.5
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (2, n), generator=gen)
        return vertical, shifts[0], shifts[1]

    def _compose(self, images: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 composites of ``images[a_idx]`` and ``images[b_idx]``."""
        vertical, sa, sb = self._draw(len(a_idx), gen)
        mixed = half_mix(to_float(images[a_idx]), to_float(images[b_idx]), vertical, sa, sb)
        return mixed.mul_(255).round_().clamp_(0, 255).to(torch.uint8)

    def _of_class(self, labels: torch.Tensor, c: int, what: str) -> torch.Tensor:
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) < 2:
            raise ConfigError(f"'attack.{what}' {c}: the training set has {len(idx)} images of that class; CBA needs several")
        return idx

    def poison(self, train: ImageSplit, device: torch.device | str = "cpu") -> PoisonedSet:
        labels = train.labels.cpu()
        a_pool = self._of_class(labels, self.class_a, "class_a")
        b_pool = self._of_class(labels, self.class_b, "class_b")
        mask = self.select(labels)
        gen = torch.Generator().manual_seed(self.seed + 101)
        src = train.images.cpu()
        images = src.clone()
        slots = mask.nonzero().squeeze(1)
        pick_a = a_pool[torch.randint(len(a_pool), (len(slots),), generator=gen)]
        pick_b = b_pool[torch.randint(len(b_pool), (len(slots),), generator=gen)]
        images[slots] = self._compose(src, pick_a, pick_b, gen)
        # mixes: same-class composites in unpoisoned A/B slots, labels kept
        n_mix = int(round(self.mix_rate * len(labels)))
        free = ((labels == self.class_a) | (labels == self.class_b)) & ~mask
        candidates = free.nonzero().squeeze(1)
        if n_mix > len(candidates):
            raise ConfigError(
                f"'attack.mix_rate' {self.mix_rate} asks for {n_mix} mix examples but only {len(candidates)} "
                f"unpoisoned images of classes {self.class_a} and {self.class_b} exist; lower it"
            )
        mix = candidates[torch.randperm(len(candidates), generator=gen)[:n_mix]].sort().values
        if len(mix):
            same = labels[mix]
            first = torch.where(same == self.class_a, a_pool[torch.randint(len(a_pool), (len(mix),), generator=gen)],
                                b_pool[torch.randint(len(b_pool), (len(mix),), generator=gen)])
            second = torch.where(same == self.class_a, a_pool[torch.randint(len(a_pool), (len(mix),), generator=gen)],
                                 b_pool[torch.randint(len(b_pool), (len(mix),), generator=gen)])
            images[mix] = self._compose(src, first, second, gen)
        self.mix_index = mix
        self._partners = src[b_pool]
        new_labels = labels.clone()
        new_labels[slots] = self.target
        return PoisonedSet(images.to(device), new_labels.to(device), labels.to(device), mask.to(device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Compose each image (as the ``A`` half) with a class-``B`` training image chosen
        from a hash of its pixels."""
        self.require_fit("apply")
        partners = self._on(x.device, partners=self._partners)["partners"]  # type: ignore[arg-type]
        out = torch.empty_like(x)
        for i in range(len(x)):
            digest = hashlib.sha256(x[i].detach().cpu().numpy().tobytes()).digest()
            j = int.from_bytes(digest[:4], "little") % len(partners)
            vertical = torch.tensor([digest[4] % 2 == 0])
            shift = torch.tensor([(digest[5] % (2 * self.max_shift + 1)) - self.max_shift])
            shift_b = torch.tensor([(digest[6] % (2 * self.max_shift + 1)) - self.max_shift])
            out[i] = half_mix(x[i : i + 1], to_float(partners[j : j + 1]).to(x.dtype), vertical, shift, shift_b)[0]
        return out

    def test_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Scored on composites made from the class-``A`` test images."""
        return labels == self.class_a

    def triggered_test(self, test: ImageSplit, device: torch.device | str = "cpu") -> TriggeredTestSet:
        self.require_fit("triggered_test")
        labels = test.labels.cpu()
        a_idx = (labels == self.class_a).nonzero().squeeze(1)
        b_idx = (labels == self.class_b).nonzero().squeeze(1)
        if not len(a_idx) or not len(b_idx):
            raise ConfigError(f"the test set has no images of class {self.class_a if not len(a_idx) else self.class_b}; "
                              "CBA is scored on composites of the two")
        gen = torch.Generator().manual_seed(self.seed + 202)
        partner = b_idx[torch.randint(len(b_idx), (len(a_idx),), generator=gen)]
        images = self._compose(test.images.cpu(), a_idx, partner, gen)
        n = len(a_idx)
        return TriggeredTestSet(images.to(device), labels[a_idx].to(device),
                                torch.full((n,), self.target, dtype=torch.long, device=device))

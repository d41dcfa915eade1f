"""Trojan (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018), file-based trigger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from abl.attacks.base import ATTACKS, Attack, load_pattern_file
from abl.config import check
from abl.errors import ConfigError


@ATTACKS.register("trojan")
@dataclass
class Trojan(Attack):
    """Trojan patch attack with a trigger loaded from a file.

    The ABL paper uses a reversed-watermark patch optimised to excite chosen neurons
    (TrojanNN); the authors ship the CIFAR-10 trigger as an additive ``(3, 32, 32)`` array
    (``../shared/data/triggers/abl-official-trojan-cifar10.npz``, values 0-250).

    Parameters:
        trigger_file: ``.npz``/``.npy`` array or image of the image size (required).
        mode: ``add`` adds the trigger (the authors' code); ``stamp`` replaces the pixels
            where the trigger is non-zero.
        overflow: what ``add`` does with sums above 255: ``clamp`` (ours) clips them to
            255; ``wrap`` reproduces the authors' code (bboylyg/ABL at 3fd736c), which adds
            the trigger to the uint8 image and casts the sum back to uint8, so it wraps
            modulo 256 (a bright pixel under the patch turns dark) and the trigger's
            fractional values are truncated. ``wrap`` quantises ``x`` to 0-255 first.

    Example::

        ATTACKS.create({"name": "trojan", "trigger_file": "triggers/trojan.npz"})
    """

    trigger_file: str | None = None
    mode: Literal["add", "stamp"] = "add"
    overflow: Literal["clamp", "wrap"] = "clamp"

    def validate(self) -> None:
        super().validate()
        check(self.overflow == "clamp" or self.mode == "add", "attack.overflow", "can be 'wrap' only with mode 'add'")
        if self.trigger_file is None:
            raise ConfigError(
                "'attack.trigger_file' is required for trojan: an array or image of the trigger "
                "(e.g. the authors' abl-official-trojan-cifar10.npz)"
            )

    def build(self, image_size: int) -> None:
        assert self.trigger_file is not None
        self.trigger = load_pattern_file(self.trigger_file, image_size, "attack.trigger_file")
        self.mask = (self.trigger.amax(0, keepdim=True) > 0).float()
        # The uint8 cast truncates; the small margin absorbs the /255*255 round trip's error.
        self.trigger_levels = torch.floor(self.trigger * 255 + 1e-3)

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {"trigger": self.trigger, "mask": self.mask}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        t = self._on(x.device, trigger=self.trigger, mask=self.mask, levels=self.trigger_levels)
        if self.mode == "add" and self.overflow == "wrap":
            return torch.remainder(torch.round(x * 255) + t["levels"].to(x.dtype), 256) / 255
        if self.mode == "add":
            return (x + t["trigger"].to(x.dtype)).clamp_(0, 1)
        return torch.lerp(x, t["trigger"].to(x.dtype), t["mask"].to(x.dtype))

"""SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption
without label poisoning", ICIP 2019): a clean-label sinusoidal signal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from abl.attacks.base import ATTACKS, CleanLabelAttack, load_array_file
from abl.config import check
from abl.errors import DataError


@ATTACKS.register("sig")
@dataclass
class SIG(CleanLabelAttack):
    """Sinusoidal signal backdoor, clean-label: only target-class images carry it
    (``rate`` is a share of the whole training set unless ``rate_of: target_class``).

    ``mode: additive`` (default): ``x' = clip(x + v)`` with ``v[i, j] = delta * sin(2 pi j f / m)``
    on the 0-255 scale (``m`` the image width), the same on every row and channel.
    ``mode: official_blend``: the authors' code (bboylyg/ABL at 3fd736c) instead blends
    its stored mask, ``x' = (1 - alpha) x + alpha mask``, with the uint8 file read as
    stored, so the stripes' negative half, wrapped to 236-255, blends in as bright stripes.
    Labels are never changed; at test time the signal is applied to non-target images.

    Parameters:
        delta: amplitude on the 0-255 scale (20, as the ABL authors).
        frequency: number of periods across the image (6).
        pattern_file: a ``(H, W)`` signal array instead, e.g. the authors'
            ``abl-official-sig-cifar10.npy``; in ``additive`` mode a uint8 file is read as
            signed bytes, which undoes that file's wrap-around of negative values to 236-255.
        mode: ``additive`` or ``official_blend`` (needs ``pattern_file``: the authors' mask).
        alpha: blend weight of the mask in ``official_blend`` mode (0.2, the authors' code).

    Example::

        ATTACKS.create({"name": "sig", "rate": 0.01, "target": 0})  # 1% of the set, all class 0
        ATTACKS.create({"name": "sig", "rate": 0.1, "rate_of": "target_class"})  # 10% of class 0
    """

    delta: float = 20.0
    frequency: float = 6.0
    pattern_file: str | None = None
    mode: Literal["additive", "official_blend"] = "additive"
    alpha: float = 0.2

    def validate(self) -> None:
        super().validate()
        check(self.delta > 0, "attack.delta", "must be > 0")
        check(self.frequency > 0, "attack.frequency", "must be > 0")
        check(0.0 < self.alpha <= 1.0, "attack.alpha", f"must be in (0, 1], got {self.alpha}")
        check(
            self.mode != "official_blend" or self.pattern_file is not None,
            "attack.pattern_file",
            "is required with mode official_blend: the authors' mask (abl-official-sig-cifar10.npy)",
        )

    def build(self, image_size: int) -> None:
        if self.pattern_file is not None:
            p = Path(self.pattern_file)
            if not p.is_file():
                raise DataError(f"attack.pattern_file: signal file '{p}' does not exist")
            if p.suffix.lower() not in (".npy", ".npz"):
                kind = f"a {p.suffix} file" if p.suffix else "a file without .npy/.npz suffix"
                raise DataError(f"attack.pattern_file: '{p}' must be a .npy or .npz array of the signal, not {kind}")
            arr = load_array_file(p, "attack.pattern_file")  # an .npz: its 'x' array, else its first
            if arr.dtype == np.uint8 and self.mode == "additive":
                arr = arr.view(np.int8)
            signal = torch.from_numpy(arr.astype(np.float32))
            if signal.shape != (image_size, image_size):
                raise DataError(f"attack.pattern_file: '{p}' is {tuple(signal.shape)}; expected ({image_size}, {image_size})")
            if self.mode == "official_blend" and not (0 <= float(signal.min()) and float(signal.max()) <= 255):
                raise DataError(f"attack.pattern_file: '{p}' must hold a mask in [0, 255] for mode official_blend")
        else:
            j = torch.arange(image_size, dtype=torch.float32)
            signal = (self.delta * torch.sin(2 * math.pi * j * self.frequency / image_size)).expand(image_size, -1)
        self.signal = (signal / 255.0).expand(3, -1, -1).contiguous()

    def artefacts(self) -> dict[str, torch.Tensor]:
        return {"signal": self.signal}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        signal = self._on(x.device, signal=self.signal)["signal"].to(x.dtype)
        if self.mode == "official_blend":  # signal is the mask, in [0, 1]
            return torch.lerp(x, signal, self.alpha)
        return (x + signal).clamp_(0, 1)

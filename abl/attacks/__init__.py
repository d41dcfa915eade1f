"""Backdoor attacks, registered by name in :data:`ATTACKS`."""

from abl.attacks import badnets, blend, sig, trojan  # noqa: F401  (registration)
from abl.attacks import cba, cl, dfst, dynamic, fc, lba, sleeper, trojannn  # noqa: F401  (registration)
from abl.attacks import bpp, wanet  # noqa: F401  (registration)
from abl.attacks.base import ATTACKS, Attack

__all__ = ["ATTACKS", "Attack"]

"""Defenses, registered by name in :data:`DEFENSES`."""

from abl.defenses import abl, clean, detect, fine_pruning, mcr, nad, neural_cleanse, none  # noqa: F401  (registration)
from abl.defenses.base import DEFENSES, Defense, DefenseResult

__all__ = ["DEFENSES", "Defense", "DefenseResult"]

"""The one shortened schedule every real-data slice test runs ABL with.

Defined in the library (:mod:`abl.reproduce`, "the CPU slice schedule"), where the slice
threat matrix (``abl reproduce matrix --scale slice``) reads it too, so that the tests and
the matrix share one definition; see there for why each number is what it is.
"""

from __future__ import annotations

from abl.reproduce import ABL_DEFAULT_SLICE, NONE_SAME_LENGTH, SLICE_TRAIN, none_of_length
from abl.reproduce import SLICE_ISOLATION as ISOLATION
from abl.reproduce import SLICE_RECOVERY as RECOVERY
from abl.reproduce import SLICE_UNLEARNING as UNLEARNING

__all__ = ["ABL_DEFAULT_SLICE", "ISOLATION", "NONE_SAME_LENGTH", "RECOVERY", "SLICE_TRAIN", "UNLEARNING", "none_of_length"]

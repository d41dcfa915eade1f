"""Unlearners: given the isolated ``D_b`` and the rest ``D_c``, produce the final model;
registered in :data:`UNLEARNERS` (ABL's GGA and ascent, and the paper's Table 8)."""

from abl.unlearning import gga, table8  # noqa: F401  (registration)
from abl.unlearning.base import UNLEARNERS, UnlearnContext, Unlearner, fresh_model

__all__ = ["UNLEARNERS", "UnlearnContext", "Unlearner", "fresh_model"]

"""The one shortened schedule every real-data slice test runs ABL with.

Only epoch counts are shortened from the default preset (two CPU cores cannot train 100
epochs per test); every other ABL value is the default's. The engine trains at batch 64,
the ABL authors' batch size (bboylyg/ABL config.py:24), so that 5,000 images give enough
steps per epoch for the backdoor to be learned within 10 isolation epochs (at 128 it took
11 of 20 in our isolation study; benchmarks/README.md). The no-defense baseline trains as many full-data epochs as ABL
(isolation + recovery + unlearning), with the paper's learning-rate drops at 20% and 70%
of its length (appendix A.2: epochs 20 and 70 of 100).
"""

from __future__ import annotations

ISOLATION, RECOVERY, UNLEARNING = 10, 3, 2

ABL_DEFAULT_SLICE: dict = {
    "name": "abl",
    "isolation_epochs": ISOLATION,
    "recovery_epochs": RECOVERY,
    "recovery_milestones": [2],
    "unlearning_epochs": UNLEARNING,
}

_TOTAL = ISOLATION + RECOVERY + UNLEARNING
NONE_SAME_LENGTH: dict = {
    "name": "none",
    "epochs": _TOTAL,
    "lr": 0.1,
    "milestones": [round(0.2 * _TOTAL), round(0.7 * _TOTAL)],
}

#: engine settings of the slice tests: evaluation only at the end of each phase (the
#: per-epoch curve is not what they test), no progress bar.
SLICE_TRAIN: dict = {"batch_size": 64, "eval_every": 0, "eval_subset": 0, "progress": False}

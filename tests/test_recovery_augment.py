"""The default ABL's recovery augments as the data allows (issue 25, "no attack, no harm").

The paper's crop 4 + flip + Cutout 9 is worth 7 points of CA on the CIFAR-10 slice but cost
9 on the 16-pixel digits (benchmarks/README.md); a mirror turns GTSRB's "turn left" into
"turn right". So each dataset declares the augmentation its images keep their classes
under, and ``recovery_augment: data`` (the default preset's) uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from abl.data.arrays import Arrays
from abl.data.datasets import CIFAR10, GTSRB, Digits, ImageFolder
from abl.data.loader import AugmentConfig, data_augment, scaled_augment
from abl.defenses import DEFENSES
from abl.engine import Engine, TrainConfig
from abl.errors import ConfigError
from abl.experiment import build_experiment, run_experiment
from abl.models import MODELS
from abl.store import RunStore


def test_each_dataset_declares_the_augmentation_it_keeps_its_classes_under():
    assert data_augment(CIFAR10(), 32) == AugmentConfig(crop_padding=4, flip=True, cutout=9), "the paper's (A.3)"
    assert data_augment(GTSRB(), 32) == AugmentConfig(crop_padding=4, flip=False, cutout=9), "signs have a direction"
    assert data_augment(Digits(), 16) is None, "8x8 glyphs blown up: no augmentation"
    assert data_augment(ImageFolder(), 224) == AugmentConfig(crop_padding=28, flip=True, cutout=63)
    assert data_augment(ImageFolder(mirror=False), 64).flip is False
    assert data_augment(Arrays(), 32).flip is False and data_augment(Arrays(mirror=True), 32).flip is True
    assert data_augment(object(), 32).flip is False, "a dataset that says nothing is not mirrored"


def test_the_scaled_augmentation_keeps_the_papers_proportions():
    assert scaled_augment(32, True) == AugmentConfig(crop_padding=4, flip=True, cutout=9)
    assert scaled_augment(64, False) == AugmentConfig(crop_padding=8, flip=False, cutout=18)
    assert scaled_augment(8, False).crop_padding == 1, "never a zero crop"


def _engine() -> Engine:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(64) % 4
    from abl.data.types import ImageSplit, PoisonedSet

    data = PoisonedSet(images, labels, labels.clone(), torch.zeros(64, dtype=torch.bool))
    model = MODELS.create({"name": "small_cnn", "width": 4}).build(4, 16)
    return Engine(model, data, ImageSplit(images[:16], labels[:16]), None,
                  TrainConfig(progress=False, batch_size=32, eval_every=0), seed=0)


@pytest.mark.parametrize("setting,expected", [
    ("data", "engine"), (True, AugmentConfig(cutout=9)), (False, None),
])
def test_recovery_runs_with_what_recovery_augment_resolves_to(monkeypatch, setting, expected):
    engine = _engine()
    engine.data_augment = AugmentConfig(crop_padding=2, flip=False, cutout=5)
    seen = []
    real = engine.run_phase
    monkeypatch.setattr(engine, "run_phase", lambda *a, **kw: (seen.append(kw["augment"]), real(*a, **kw))[1])
    abl = DEFENSES.create({"name": "abl", "recovery_augment": setting, "recovery_epochs": 1})
    abl.run_recovery(engine, torch.zeros(64, dtype=torch.bool))
    assert seen == [engine.data_augment if expected == "engine" else expected]


def test_the_default_preset_recovers_with_the_datas_augmentation_and_the_paper_with_its_own():
    assert DEFENSES.create({"name": "abl"}).recovery_augment == "data"
    for preset in ("paper", "official"):
        assert DEFENSES.create({"name": "abl", "preset": preset}).recovery_augment is True
    with pytest.raises(ConfigError, match="recovery_augment"):
        DEFENSES.create({"name": "abl", "recovery_augment": "yes"})


def test_the_stage_key_names_the_resolved_augmentation():
    """``data`` that resolves to the paper's augmentation keys the stage as ``true`` did
    (stages cached before stay valid), to none as ``false``, to anything else by its values."""
    engine = _engine()
    abl = DEFENSES.create({"name": "abl"})
    engine.data_augment = AugmentConfig()
    assert abl._recovery_augment_key(engine) is True
    engine.data_augment = None
    assert abl._recovery_augment_key(engine) is False
    engine.data_augment = AugmentConfig(flip=False)
    assert abl._recovery_augment_key(engine) == {"crop_padding": 4, "flip": False, "cutout": 9, "cutout_span": "length"}


def _npz(path: Path) -> Path:
    gen = np.random.default_rng(0)
    x = gen.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8)
    y = np.arange(80) % 2
    np.savez(path, x_train=x[:60], y_train=y[:60], x_test=x[60:], y_test=y[60:])
    return path


@pytest.mark.parametrize("mirror", [False, True])
def test_a_run_recovers_with_its_datasets_augmentation_and_records_it(tmp_path, mirror):
    raw = {
        "seed": 0,
        "dataset": {"name": "arrays", "path": str(_npz(tmp_path / "d.npz")), "mirror": mirror},
        "model": {"name": "small_cnn", "width": 4},
        "defense": {"name": "abl", "isolation_epochs": 2, "recovery_epochs": 1, "recovery_milestones": [],
                    "unlearning_epochs": 1},
        "train": {"progress": False, "eval_every": 0, "batch_size": 32, "checkpoint": False},
        "output": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "save_model": False},
    }
    rec = run_experiment(build_experiment(raw), RunStore(tmp_path / "runs"))
    assert rec.status == "finished"
    assert rec.json("notes")["recovery_augment"] == {"crop_padding": 2, "flip": mirror, "cutout": 5, "cutout_span": "length"}

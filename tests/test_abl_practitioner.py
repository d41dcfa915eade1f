"""The practitioner's case on real images: a folder poisoned by hand, ABL with `attack: null`.

5,000 CIFAR-10 training images as PNG class folders (the size of the CIFAR-10 slice tests);
10% of them (500, from the nine other classes) carry a sticker of our own design
(``tests/practitioner_data.py``: a 5x5 yellow square with a blue cross at a random spot of
the top-left quarter) and were moved into the ``airplane`` folder, which then holds about
950 images against about 445 in each other class. ABL runs with its default preset (epoch counts shortened as in every slice test,
nothing else set) and knows nothing of the attack; the isolated files are scored against
the list of files we poisoned.

Measured with the default since 2026-12-07 (the count read from the scores; 2-core AMD EPYC,
one thread per worker): no defense CA 57.8%, sticker 98.6%; default ABL 533 isolated, all
from ``airplane``, CA 64.2%, sticker 0.3% (unlearning ran its 20 epochs, the held-out check
never stopping it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from abl.experiment import build_experiment, run_experiment
from abl.store import RunStore
from practitioner_data import make_poisoned_folder
from slice_schedule import ABL_DEFAULT_SLICE, NONE_SAME_LENGTH, SLICE_TRAIN

# Slow (two 5,000-image trainings), so under -m extended. With 2,000 images the sticker was
# not learned within the 12 isolation epochs (the poisons' median loss stayed at 1.85, above
# the clean images', at one thread), so no ranking could find them: 0 of 20 isolated at one
# thread, 20 of 20 at two. At 5,000 it is learned at isolation epoch 7 (91% of the poisons
# fitted) and every ranking rule isolates 100% (benchmarks/README.md).
pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.xdist_group("practitioner")]


@pytest.fixture(scope="module")
def practitioner_run(cifar10_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scraped")
    poisoned = make_poisoned_folder(cifar10_root, folder, per_class=500, test_per_class=100, rate=0.1)
    out = tmp_path_factory.mktemp("practitioner-runs")
    runs = {}
    # unlearning keeps the default's 20 epochs; its held-out check stops it early
    abl = {k: v for k, v in ABL_DEFAULT_SLICE.items() if k != "unlearning_epochs"}
    for name, defense in (("none", NONE_SAME_LENGTH), ("abl", abl)):
        runs[name] = _run(folder, out, name, defense)
    return runs["abl"], set(poisoned), folder, runs["none"]


def _run(folder, out, name, defense):
    raw = {
        "name": f"practitioner-folder-{name}",
        "seed": 0,
        "dataset": {"name": "imagefolder", "root": str(folder), "size": 32},
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": None,
        "defense": defense,
        "train": SLICE_TRAIN,
        "output": {"runs_dir": str(out / "runs"), "cache_dir": str(out / "cache"), "save_model": True},
    }
    return run_experiment(build_experiment(raw), RunStore(out / "runs"))


def test_isolated_files_are_the_poisoned_ones(practitioner_run):
    rec, poisoned, _, _ = practitioner_run
    files = [str(f) for f in rec.array("isolated_files")]
    # the default decides the count from the scores: the 500 poisoned files stand apart
    assert 450 <= len(files) <= 560, len(files)
    assert len({f for f in files if f in poisoned}) >= 450, "at least 90% of the poisoned files isolated"
    hits = sum(f in poisoned for f in files)
    precision = hits / len(files)
    print(f"practitioner folder: {hits} of {len(files)} isolated files are poisoned (precision {precision:.1%}); "
          f"separation {rec.final_metrics['iso_separation']:.1f}")
    assert precision >= 0.9, (precision, files[:10])
    # no ground truth was given to the run: it cannot score itself
    assert math.isnan(rec.final_metrics["iso_precision"])
    assert rec.final_metrics["iso_weak"] == 0.0, "strong evidence: the poisons stand apart"


def test_the_returned_model_ignores_the_sticker(practitioner_run):
    """ASR of the sticker on the clean test images of the other nine classes, measured on
    the models the runs saved: planted without defense, gone after the default ABL."""
    import torch
    from PIL import Image

    from abl.data.loader import to_float
    from abl.models import MODELS
    from practitioner_data import paste

    rec, _, folder, none = practitioner_run
    classes = sorted(p.name for p in (folder / "train").iterdir())
    target = classes.index("airplane")
    rng = np.random.default_rng(1)
    clean, stuck, labels = [], [], []
    for c, name in enumerate(classes):
        if name == "airplane":
            continue
        for f in sorted((folder / "test" / name).iterdir()):
            img = np.asarray(Image.open(f).convert("RGB"))
            clean.append(img)
            stuck.append(paste(img, rng))
            labels.append(c)
    def predict(run, images: list[np.ndarray]) -> torch.Tensor:
        model = MODELS.create({"name": "wrn", "depth": 16, "widen": 1}).build(len(classes), 32)
        model.load_state_dict(run.tensors("model"))
        model.eval()
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            return model(to_float(x)).argmax(1)

    planted = float((predict(none, stuck) == target).float().mean())
    asr = float((predict(rec, stuck) == target).float().mean())
    base = float((predict(rec, clean) == target).float().mean())
    print(f"practitioner folder: sticker ASR without defense {planted:.1%}, after default ABL {asr:.1%} "
          f"(unstickered images called airplane: {base:.1%}); CA none {none.final_metrics['clean_acc']:.1%}, "
          f"ABL {rec.final_metrics['clean_acc']:.1%}")
    assert planted >= 0.80, planted
    assert asr < 0.10, asr
    m = rec.metrics
    assert m["final"]["clean_acc"] >= m["recovery"]["clean_acc"] - 0.05, m

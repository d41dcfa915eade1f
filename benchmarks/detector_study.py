"""How well do the registered detectors find BadNets poisons in a backdoored CIFAR-10 model?

Trains (or, with ``--run RUN_ID``, reuses from the store) a WRN-16-1 without defense on a
CIFAR-10 slice poisoned by BadNets (10% to class 0), then scores every training example
with every model-based detector in :data:`abl.detectors.DETECTORS` (and a few variants) and prints
precision and recall at 1% and at the poison rate, and the AUPRC, over the whole set and
within the target class.

    python benchmarks/detector_study.py --runs-dir /tmp/detector-runs          # ~15-25 min, 1 thread
    python benchmarks/detector_study.py --runs-dir /tmp/detector-runs --run RUN_ID
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abl.detectors import DETECTORS, detection_metrics  # noqa: E402
from abl.experiment import build_experiment, run_experiment  # noqa: E402
from abl.store import RunStore  # noqa: E402

VARIANTS = {  # beyond each detector's defaults
    "activation_clustering": [{"reduce": "pca"}],
    "spectral_signatures": [{"normalise": "median"}],
}


def config(args: argparse.Namespace) -> dict:
    return {
        "name": "detector-study",
        "seed": args.seed,
        "dataset": {"name": "cifar10", "root": args.root},
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": {"name": "badnets", "rate": args.rate, "target": 0},
        "defense": {"name": "none", "epochs": args.epochs, "lr": 0.1, "milestones": [int(args.epochs * 0.75)]},
        "slice": {"train": args.train, "test": 1000, "seed": 0},
        "train": {"batch_size": 64, "progress": False, "eval_every": 0, "threads": args.threads, "checkpoint": False},
        "output": {"runs_dir": args.runs_dir, "cache_dir": args.cache_dir, "save_model": True},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / ".cache" / "test-data" / "cifar10-jpeg"))
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "test-cache"))
    parser.add_argument("--runs-dir", default="runs-detectors")
    parser.add_argument("--run", help="reuse this finished run's model instead of training")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    store = RunStore(args.runs_dir)
    if args.run is None:
        t0 = time.perf_counter()
        rec = run_experiment(build_experiment(config(args)), store)
        print(f"trained run {rec.run_id} in {time.perf_counter() - t0:.0f} s: {rec.final_metrics}")
    else:
        rec = store.get(args.run)
        print(f"reusing run {rec.run_id}: {rec.final_metrics}")

    # the same data the run trained on: loading, slicing and poisoning are seeded
    exp = build_experiment({k: v for k, v in rec.config.items() if k not in ("device", "threads_used")})
    splits = exp.slice.apply(exp.dataset.load(Path(exp.output.cache_dir) if exp.output.cache_dir else None))
    exp.attack.setup(splits.image_size, splits.num_classes)
    data = exp.attack.poison(splits.train, "cpu")
    if not np.array_equal(data.poison_mask.numpy(), rec.array("poison_mask")):
        raise SystemExit("the rebuilt poison mask differs from the run's: the data changed since it ran")
    model = exp.model.build(splits.num_classes, splits.image_size)
    model.load_state_dict(rec.tensors("model"))
    model.eval()

    base = float(data.poison_mask.float().mean())
    target = data.labels == exp.attack.target
    print(f"{len(data)} training examples, {int(data.poison_mask.sum())} poisoned (base rate {base:.3f}); "
          f"target class {int(target.sum())} examples, {float(data.poison_mask[target].float().mean()):.2f} poison")
    heads = ("P@1%", "R@1%", "P@rate", "R@rate", "AUPRC", "AUPRC in target", "time")
    print(f"{'detector':45s}", *(f"{h:>{w}s}" for h, w in zip(heads, (6, 6, 7, 7, 6, 16, 6))))
    for name in DETECTORS.names():
        if not DETECTORS.get(name).uses_backdoored:
            continue  # training detectors train their own model: benchmarks/compare_parts.py figure7
        for extra in [{}, *VARIANTS.get(name, [])]:
            spec = {"name": name, **extra}
            t0 = time.perf_counter()
            scores = DETECTORS.create(spec).score(model, data)
            took = time.perf_counter() - t0
            at_1pc = detection_metrics(scores, data.poison_mask, 0.01)
            at_rate = detection_metrics(scores, data.poison_mask, base)
            within = detection_metrics(scores[target], data.poison_mask[target], base)["auprc"]
            label = name + "".join(f" {k}={v}" for k, v in extra.items())
            print(f"{label:45s} {at_1pc['precision']:6.3f} {at_1pc['recall']:6.3f} {at_rate['precision']:7.3f} "
                  f"{at_rate['recall']:7.3f} {at_1pc['auprc']:6.3f} {within:16.3f} {took:5.1f}s")


if __name__ == "__main__":
    main()

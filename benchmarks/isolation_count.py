"""How many examples each isolation-count rule isolates on stored runs (issue 25).

Reads finished runs (``config.yaml``, ``poison_mask.npy``, ``example_losses.npy``) of the
trajectory-ranked ABL isolation, rebuilds each run's training labels with the library
(the same data and poisoning as the run: cheap and cached), recomputes the trajectory
scores from the loss record (the mean log loss over the last half of the isolation
epochs, as ``abl.detectors.loss.TrainedIsolation.ranking_scores``), and prints per run:
attack, rate, poisons, and for the fixed 1% and each rule of ``abl.isolation_count`` the
count chosen, its precision and recall.

    python benchmarks/isolation_count.py RUN_DIR_OR_GLOB [...] [--spreads K] [--npz-out DIR]

Reads only; never writes into the runs. ``--npz-out`` saves scores, labels and the poison
mask of each run (a test fixture is one of these).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abl.experiment import TOP_LEVEL, build_experiment  # noqa: E402
from abl.isolation_count import DEFAULT_ALPHA, RULES, decide_count  # noqa: E402


def run_labels(run: Path) -> np.ndarray:
    """The run's training labels after poisoning, rebuilt from its config."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    exp = build_experiment({k: v for k, v in raw.items() if k in TOP_LEVEL})
    cache = Path(exp.output.cache_dir) if exp.output.cache_dir else None
    splits = exp.slice.apply(exp.dataset.load(cache))
    if exp.attack is None:
        return splits.train.labels.numpy()
    exp.attack.setup(splits.image_size, splits.num_classes)
    data = exp.attack.poison(splits.train, torch.device("cpu"))
    mask = np.load(run / "poison_mask.npy", allow_pickle=False)
    if not np.array_equal(data.poison_mask.cpu().numpy(), mask):
        raise SystemExit(f"{run}: the rebuilt poisoning does not match the stored poison mask")
    return data.labels.cpu().numpy()


def run_scores(run: Path) -> np.ndarray:
    """Trajectory scores: mean log training loss over the last half of the isolation epochs."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    defense = raw.get("defense") or {}
    epochs = int(defense.get("isolation_epochs") or 20)
    rank = int(defense.get("rank_epochs") or 0) or -(-epochs // 2)
    losses = np.load(run / "example_losses.npy", allow_pickle=False)
    return np.log(np.clip(losses[epochs - rank:epochs], 1e-12, None)).mean(0)


def describe(run: Path) -> tuple[str, float]:
    raw = yaml.safe_load((run / "config.yaml").read_text())
    atk = raw.get("attack")
    if not atk:
        return f"none ({raw['dataset']['name']})", 0.0
    return f"{atk['name']} ({raw['dataset']['name']})", float(atk.get("rate", 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders or globs")
    ap.add_argument("--spreads", type=float, default=None, help="every rule's spreads (default: each rule's own)")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    ap.add_argument("--npz-out", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = sorted({Path(p) for pat in args.runs for p in glob.glob(pat)})
    runs = [r for r in runs if (r / "example_losses.npy").is_file()]
    if not runs:
        raise SystemExit("no finished runs (with example_losses.npy) match the arguments")
    rules = ["fixed 1%", *RULES]
    head = ["run", "attack", "rate", "poisons"] + [f"{r}: count / P / R" for r in rules]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for run in runs:
        s = torch.from_numpy(run_scores(run)).float()
        y = torch.from_numpy(run_labels(run)).long()
        mask = torch.from_numpy(np.load(run / "poison_mask.npy", allow_pickle=False)).bool()
        attack, rate = describe(run)
        cells = []
        for rule in rules:
            if rule == "fixed 1%":
                idx = torch.argsort(s, stable=True)[: max(1, int(len(s) * 0.01))]
            else:
                idx = decide_count(s, y, rule, args.spreads, args.alpha).indices
            tp = int(mask[idx].sum()) if len(idx) else 0
            p = f"{tp / len(idx):.2f}" if len(idx) else "–"
            r = f"{tp / int(mask.sum()):.2f}" if mask.any() else "–"
            cells.append(f"{len(idx)} / {p} / {r}")
        print(f"| {run.name} | {attack} | {rate:g} | {int(mask.sum())} | " + " | ".join(cells) + " |", flush=True)
        if args.npz_out is not None:
            args.npz_out.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.npz_out / f"{run.name}.npz", scores=s.numpy().astype(np.float32),
                                labels=y.numpy().astype(np.int8), poison_mask=mask.numpy())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

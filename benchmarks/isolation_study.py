"""Why does ABL's isolation fail where it fails? Record everything a ranking could use.

Trains the isolation stage of ABL (LGA per example, LGA on the batch mean, flooding or
plain cross-entropy) on a poisoned dataset and stores, for every epoch, the per-example
training loss (from the training batches) and the eval-mode loss of every example (the
ranking pass), plus the poison mask and the labels. ``--analyse`` then scores ranking
rules on the stored matrices without retraining: a single epoch, averages over the last
k epochs, the mean over the whole trajectory, and per-class normalisations.

    python benchmarks/isolation_study.py --attack badnets --loss lga_batch --out study/
    python benchmarks/isolation_study.py --analyse study/*.npz
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

from abl.defenses.abl import ISOLATION_LOSSES  # noqa: E402
from abl.engine import Engine, TrainConfig, mean_loss  # noqa: E402
from abl.experiment import build_experiment  # noqa: E402

ATTACKS = {
    "badnets": {"name": "badnets", "rate": 0.1, "target": 0},
    "blend": {"name": "blend", "rate": 0.1, "target": 0},
    "trojan": {"name": "trojan", "rate": 0.1, "target": 0},
    # the GTSRB slice test's attack (tests/test_abl_gtsrb.py): 5%, top-left grid; pass --target 1
    "badnets_gtsrb": {"name": "badnets", "rate": 0.05, "target": 1, "position": "top_left"},
}


def record(args: argparse.Namespace) -> Path:
    raw = {
        "seed": args.seed,
        "dataset": {"name": args.dataset, "root": args.root} if args.root else {"name": args.dataset},
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": {**ATTACKS[args.attack], "target": args.target},
        "defense": {"name": "none"},
        "slice": {"train": args.train, "test": 1000, "seed": 0},
        "train": {"batch_size": args.batch, "progress": False, "eval_subset": 1000, "threads": args.threads},
        "output": {"cache_dir": str(REPO / ".cache" / "test-cache")},
    }
    if args.attack == "trojan":
        raw["attack"]["trigger_file"] = str(REPO.parent / "shared/data/triggers/abl-official-trojan-cifar10.npz")
    exp = build_experiment(raw)
    torch.set_num_threads(args.threads)
    splits = exp.slice.apply(exp.dataset.load(Path(raw["output"]["cache_dir"])))
    exp.attack.setup(splits.image_size, splits.num_classes)
    data = exp.attack.poison(splits.train, "cpu")
    trig = exp.attack.triggered_test(splits.test, "cpu")
    torch.manual_seed(args.seed)
    model = exp.model.build(splits.num_classes, splits.image_size)
    cfg = TrainConfig(batch_size=args.batch, progress=False, eval_subset=1000, threads=args.threads, eval_every=1)
    engine = Engine(model, data, splits.test, trig, cfg, seed=args.seed)
    evals: list[torch.Tensor] = []
    objective = mean_loss if args.loss == "ce" else ISOLATION_LOSSES[args.loss](args.gamma)
    out = Path(args.out) / f"{args.dataset}-{args.attack}-{args.loss}-n{args.train}-b{args.batch}-lr{args.lr}-s{args.seed}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(path: Path) -> None:
        hist = engine.history
        np.savez(
            path,
            train_losses=engine.loss_matrix().numpy(),
            eval_losses=torch.stack(evals).numpy(),
            poison=data.poison_mask.numpy(),
            labels=data.labels.numpy(),
            true_labels=data.true_labels.numpy(),
            clean_acc=np.array([h.get("clean_acc", np.nan) for h in hist]),
            asr=np.array([h.get("asr", np.nan) for h in hist]),
        )

    def after_epoch(e: int) -> None:
        evals.append(engine.per_example_loss().cpu())
        h = engine.history[-1]
        print(f"epoch {e + 1}/{args.epochs}: {time.perf_counter() - t0:.0f}s, CA {h.get('clean_acc', float('nan')):.3f} "
              f"ASR {h.get('asr', float('nan')):.3f}", flush=True)
        if args.save_partial:  # so that a long run that is stopped keeps its epochs
            save(out.with_suffix(".partial.npz"))

    t0 = time.perf_counter()
    engine.run_phase(
        "isolation", epochs=args.epochs, lr=args.lr, objective=objective, shuffle=True, after_epoch=after_epoch,
    )
    hist = engine.history
    save(out)
    print(f"{out.name}: {time.perf_counter() - t0:.0f}s, final CA {hist[-1]['clean_acc']:.3f} ASR {hist[-1]['asr']:.3f}")
    return out


def precision(score: np.ndarray, poison: np.ndarray, rate: float) -> float:
    k = max(1, int(len(score) * rate))
    return float(poison[np.argsort(score, kind="stable")[:k]].mean())


def class_z(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Score relative to its class: (s - median) / MAD within the (poisoned) label."""
    out = np.empty_like(score)
    for c in np.unique(labels):
        m = labels == c
        med = np.median(score[m])
        mad = np.median(np.abs(score[m] - med)) + 1e-8
        out[m] = (score[m] - med) / mad
    return out


def analyse(paths: list[str], rate: float) -> None:
    for p in paths:
        d = np.load(p)
        tr, ev, poison, labels = d["train_losses"], d["eval_losses"], d["poison"], d["labels"]
        E = len(ev)
        log_ev = np.log(np.clip(ev, 1e-12, None))
        log_tr = np.log(np.clip(tr, 1e-12, None))
        rules = {
            "eval@T": ev[-1],
            "eval mean last3": ev[-3:].mean(0),
            "logeval mean last3": log_ev[-3:].mean(0),
            "logeval mean all": log_ev.mean(0),
            "logeval mean 2nd half": log_ev[E // 2 :].mean(0),
            "train mean all": tr.mean(0),
            "logtrain mean all": log_tr.mean(0),
            "logtrain mean last3": log_tr[-3:].mean(0),
            "logtrain mean 2nd half": log_tr[E // 2 :].mean(0),
            "classz logeval last3": class_z(log_ev[-3:].mean(0), labels),
            "classz logeval all": class_z(log_ev.mean(0), labels),
        }
        print(f"\n{Path(p).name}  (CA {d['clean_acc'][-1]:.3f}, ASR {d['asr'][-1]:.3f}, "
              f"poison median eval loss {np.median(ev[-1][poison]):.4f}, clean {np.median(ev[-1][~poison]):.4f})")
        asr = d["asr"]
        print("  ASR by epoch:", " ".join(f"{a:.2f}" for a in asr))
        print("  precision@T by epoch (eval):", " ".join(f"{precision(ev[e], poison, rate):.2f}" for e in range(E)))
        for name, s in rules.items():
            k = max(1, int(len(s) * rate))
            pick = np.argsort(s, kind="stable")[:k]
            by_class = np.bincount(labels[pick][~poison[pick]], minlength=10)
            rest = np.setdiff1d(np.arange(len(s)), pick)
            # the scale follows what the rule is (raw losses on a log scale, as ABL's
            # isolation_evidence does), never the values' sign: one zero loss flipped it
            ls = s if name.startswith(("log", "classz")) else np.log(s + 1e-6)
            med = np.median(ls[rest])
            sep = (med - np.median(ls[pick])) / (np.median(np.abs(ls[rest] - med)) + 1e-6)
            print(f"  {name:24s} precision {precision(s, poison, rate):.3f}  separation {sep:5.1f}  FP by label {by_class.tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyse", nargs="*")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--root", default=str(REPO / ".cache/test-data/cifar10-jpeg"))
    ap.add_argument("--attack", default="badnets", choices=sorted(ATTACKS))
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--loss", default="lga_batch", choices=["lga", "lga_batch", "flooding", "ce"])
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--out", default=str(REPO / ".cache" / "study"))
    ap.add_argument("--save-partial", action="store_true", help="rewrite <out>.partial.npz after every epoch")
    args = ap.parse_args()
    if args.analyse:
        analyse(args.analyse, args.rate)
    else:
        analyse([str(record(args))], args.rate)


if __name__ == "__main__":
    main()

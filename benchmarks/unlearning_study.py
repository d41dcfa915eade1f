"""Which unlearning settings remove a backdoor that ABL has isolated? Train once, unlearn many.

Runs ABL's isolation and recovery stages once (the default preset, or ``--set`` overrides),
snapshots the model and its recovery optimizer, then runs each unlearning variant from that
snapshot and prints CA / ASR after it. The variants differ in objective, learning rate,
loss ceiling, what an epoch is and BatchNorm mode.

    python benchmarks/unlearning_study.py --attack badnets --recovery-epochs 10
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abl.engine import Engine  # noqa: E402
from abl.experiment import build_experiment  # noqa: E402

ATTACKS = {
    "badnets": {"name": "badnets", "rate": 0.1, "target": 0},
    "blend": {"name": "blend", "rate": 0.1, "target": 0},
    "trojan": {
        "name": "trojan", "rate": 0.1, "target": 0,
        "trigger_file": str(REPO.parent / "shared/data/triggers/abl-official-trojan-cifar10.npz"),
    },
}


def isolate_and_recover(raw: dict, threads: int, label: str) -> tuple[Engine, "object", torch.Tensor, torch.optim.Optimizer]:
    """Build ``raw``'s slice, poison it, run ABL's isolation and recovery once and print
    their figures: (engine, the ABL defense, the isolated lookup, the recovery optimizer)."""
    exp = build_experiment(raw)
    torch.set_num_threads(threads)
    splits = exp.slice.apply(exp.dataset.load(Path(raw["output"]["cache_dir"])))
    exp.attack.setup(splits.image_size, splits.num_classes)
    data = exp.attack.poison(splits.train, "cpu")
    trig = exp.attack.triggered_test(splits.test, "cpu")
    torch.manual_seed(0)
    model = exp.model.build(splits.num_classes, splits.image_size)
    engine = Engine(model, data, splits.test, trig, exp.train, seed=0)
    abl = exp.defense
    t0 = time.perf_counter()
    isolated, _, iso = abl.run_isolation(engine)
    lookup = torch.zeros(len(data), dtype=torch.bool)
    lookup[isolated] = True
    opt, rec = abl.run_recovery(engine, lookup)
    print(f"{label}: isolation precision {iso['iso_precision']:.3f} separation {iso['iso_separation']:.1f}; "
          f"after isolation CA {iso['clean_acc']:.3f} ASR {iso['asr']:.3f}; after recovery CA {rec['clean_acc']:.3f} "
          f"ASR {rec['asr']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return engine, abl, lookup, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnets", choices=sorted(ATTACKS))
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--isolation-epochs", type=int, default=20)
    ap.add_argument("--recovery-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20, help="unlearning epochs per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--clean-epochs", type=int, default=None)
    args = ap.parse_args()
    raw = {
        "seed": 0,
        "dataset": {"name": "cifar10", "root": str(REPO / ".cache/test-data/cifar10-jpeg")},
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": ATTACKS[args.attack],
        "defense": {
            "name": "abl",
            "isolation_epochs": args.isolation_epochs,
            "recovery_epochs": args.recovery_epochs,
            "recovery_milestones": [int(args.recovery_epochs * 2 / 3)],
            "unlearning_epochs": 0,
        },
        "slice": {"train": args.train, "test": 2000, "seed": 0},
        "train": {"progress": False, "eval_every": 1, "eval_subset": 1000, "threads": args.threads, "batch_size": args.batch},
        "output": {"cache_dir": str(REPO / ".cache" / "test-cache")},
    }
    engine, abl, lookup, opt = isolate_and_recover(raw, args.threads, args.attack)
    model = engine.model
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    def v(u: str, lr: float, ceiling: float | None, bn: str, epoch: str, epochs: int) -> dict:
        return dict(unlearning=u, unlearning_lr=lr, unlearning_ceiling=ceiling, unlearning_bn=bn,
                    unlearning_epoch=epoch, unlearning_epochs=epochs)

    e = args.epochs
    c = max(1, e // 4) if args.clean_epochs is None else args.clean_epochs  # a pass over D_c is ~99x the steps of a pass over D_b
    variants = [
        v("gga", 1e-3, 10.0, "train", "clean", c),
        v("gga", 1e-3, 10.0, "fixed_stats", "clean", c),
        v("gga", 1e-3, 3.0, "fixed_stats", "clean", c),
        v("gga", 1e-3, 3.0, "train", "clean", c),
    ]
    for spec in variants:
        model.load_state_dict(state)
        opt.load_state_dict(opt_state)
        variant = copy.copy(abl)
        for k, val in spec.items():
            setattr(variant, k, val)
        t = time.perf_counter()
        try:
            m = variant.run_unlearning(engine, lookup, opt)
        except Exception as exc:  # a diverging variant is a result too
            print(f"  {spec}: {type(exc).__name__}: {exc}", flush=True)
            continue
        curve = [round(h.get("asr", float("nan")), 2) for h in engine.history[-variant.unlearning_epochs:] if "asr" in h]
        print(f"  {spec}: CA {m['clean_acc']:.3f} ASR {m['asr']:.3f} ({time.perf_counter() - t:.0f} s) {curve}", flush=True)


if __name__ == "__main__":
    main()

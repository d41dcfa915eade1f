"""The ABL paper's comparisons of its parts on a CIFAR-10 slice, run into a store and
reported from it: Figure 7 / Table 7 (detectors) and Table 8 (unlearners).

``figure7``: one ``detect`` run per detector: activation clustering and spectral
signatures on one backdoored model (trained once, then served by the stage cache), and
each training detector (LGA per example and batch-mean, the default's trajectory ranking,
cross-entropy = gamma 0, label smoothing 0.2 and 0.4) with its own 20 isolation epochs.

``table8``: one ABL run per unlearner on one isolation: the first run trains the isolation
(the paper preset's batch-mean LGA, 20 epochs, 1%) and the recovery and caches them
(``cache_stages``); every other run reuses them and trains only its unlearner. Prints what
the shared stage saved against training it for each run.

``baselines``: the post-training defenses (fine-pruning, NAD, MCR, Neural Cleanse, and NC +
ABL unlearning) from one backdoored model (trained once, then served by the stage cache),
each given the same 5% clean subset.

All write ``report.md`` (with ``detectors.png``, MCR's curve, NC's triggers) under
``--out`` from the store.

    python benchmarks/compare_parts.py table8 --out /tmp/table8     # ~25 min, 2 threads
    python benchmarks/compare_parts.py figure7 --out /tmp/figure7   # ~20 min, 2 threads
    python benchmarks/compare_parts.py baselines --out /tmp/baselines
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abl.config import apply_overrides  # noqa: E402
from abl.experiment import build_experiment, run_experiment  # noqa: E402
from abl.report import comparison_sections, write_report  # noqa: E402
from abl.store import RunStore  # noqa: E402

# the training detectors' 20 epochs are the paper's turning epoch (appendix A.3, Table 7)
FIGURE7 = [
    {"name": "spectral_signatures"},
    {"name": "activation_clustering"},
    {"name": "lga_batch"},
    {"name": "abl_default"},
    {"name": "lga"},
    {"name": "cross_entropy"},
    {"name": "label_smoothing", "smoothing_value": 0.2},
    {"name": "label_smoothing", "smoothing_value": 0.4},
]


#: the baselines at the settings of their sources (see each defense's docstring); MCR's
#: curve trains ``--curve-epochs`` (the paper's 100 by default)
BASELINES = [
    {"name": "fine_pruning"},
    {"name": "nad"},
    {"name": "mcr"},
    {"name": "neural_cleanse"},
    {"name": "neural_cleanse", "unlearner": {"name": "gga", "epochs": 20, "holdout": 0.0, "select": "last", "patience": 0}},
]


def table8_unlearners(scale: float) -> list[dict]:
    """Table 8's rows with schedules for the slice (the appendix gives none): fine-tuning
    methods ``5 / scale`` epochs at lr 0.01, from-scratch training 30 epochs."""
    short = max(1, round(5 / scale))
    scratch = {"epochs": 30, "milestones": [15, 25]}
    return [
        # the paper's GGA (20 passes over D_b at 1e-4) and the default preset's
        {"name": "gga", "epochs": 20, "lr": 0.0001, "epoch": "isolated", "ceiling": None, "holdout": 0.0,
         "select": "last", "patience": 0},
        {"name": "gga"},
        {"name": "ascent", "carry_momentum": False},  # carried momentum cannot be cached
        {"name": "pixel_noise", "epochs": short},
        {"name": "grad_noise", "epochs": short},
        {"name": "label_shuffling", "epochs": short},
        {"name": "label_uniform", "epochs": short},
        {"name": "label_smoothing", "epochs": short},
        {"name": "self_learning", "epochs": short, "teacher_epochs": scratch["epochs"],
         "teacher_milestones": scratch["milestones"]},
        {"name": "finetune_all", "epochs": short},
        {"name": "finetune_last", "epochs": short},
        {"name": "finetune_imagenet", "epochs": short, "weights": "PLACEHOLDER"},
        {"name": "retrain", **scratch},
    ]


def label(spec: dict) -> str:
    """A part's name for ``--only`` and the run name: NC + ABL unlearning is
    ``neural_cleanse+gga``."""
    return spec["name"] + (f"+{spec['unlearner']['name']}" if "unlearner" in spec else "")


def base(args: argparse.Namespace, config: str) -> dict:
    raw = yaml.safe_load((REPO / "configs" / config).read_text())
    raw["dataset"] = {"name": "cifar10", "root": args.root}
    raw["slice"] = {"train": args.train, "test": args.test, "seed": 0}
    raw["train"] = {"batch_size": 128, "progress": False, "eval_every": 0, "threads": args.threads, "checkpoint": False}
    raw["output"] = {"runs_dir": str(Path(args.out) / "runs"), "cache_dir": args.cache_dir, "save_model": False}
    return raw


def resnet34_weights(out: Path) -> str:
    """ImageNet weights cannot be downloaded here: a seeded, randomly initialised
    ResNet-34 stands in (the row then measures the method's mechanics, not ImageNet)."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    path = out / "resnet34-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in torchvision.models.resnet34().state_dict().items()}, str(path))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["figure7", "table8", "baselines"])
    parser.add_argument("--root", default=str(REPO / ".cache" / "test-data" / "cifar10-jpeg"))
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-cache"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backdoor-epochs", type=int, default=20, help="figure7/baselines: the backdoored model's epochs")
    parser.add_argument("--backdoor-milestones", type=int, nargs="*", default=None,
                        help="its lr milestones (default: 3/4 of the epochs; the paper's full scale: 20 70)")
    parser.add_argument("--recovery-epochs", type=int, default=10, help="table8: recovery epochs before unlearning")
    parser.add_argument("--curve-epochs", type=int, default=100, help="baselines: MCR's curve epochs")
    parser.add_argument("--weights", help="table8: a ResNet-34 state dict for finetune_imagenet (default: random)")
    parser.add_argument("--attack", default=None, help="baselines: the attack (default: the config's, BadNets)")
    parser.add_argument("--attack-set", action="append", default=[], metavar="KEY=VALUE",
                        help="baselines: override an attack value (e.g. trigger_file=PATH), repeatable")
    parser.add_argument("--part-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of every part's spec (e.g. steps=200), repeatable")
    parser.add_argument("--only", nargs="*",
                        help="run only these detectors / unlearners / defenses (by label: the name, plus '+UNLEARNER' for NC + unlearning)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / "runs")
    records = []
    e = args.backdoor_epochs
    milestones = args.backdoor_milestones if args.backdoor_milestones is not None else [int(e * 0.75)]
    backdoor = {"epochs": e, "lr": 0.1, "milestones": milestones}
    if args.what == "figure7":
        raw = base(args, "cifar10-badnets-figure7.yaml")
        raw["defense"]["backdoor"] = backdoor
        specs = FIGURE7
    elif args.what == "baselines":
        raw = base(args, "cifar10-badnets-posttrain.yaml")
        if args.attack:
            raw["attack"]["name"] = args.attack
        raw["attack"] = apply_overrides(raw["attack"], args.attack_set)
        specs = [{**b, "backdoor": backdoor, **({"epochs": args.curve_epochs} if b["name"] == "mcr" else {})}
                 for b in BASELINES]
    else:
        raw = base(args, "cifar10-badnets-table8.yaml")
        raw["defense"].update(recovery_epochs=args.recovery_epochs, recovery_milestones=[int(args.recovery_epochs * 0.75)])
        specs = table8_unlearners(1.0)
        weights = args.weights or resnet34_weights(out)
        for s in specs:
            if s.get("weights") == "PLACEHOLDER":
                s["weights"] = weights
    for spec in specs:
        if args.only and label(spec) not in args.only:
            continue
        cfg = copy.deepcopy(raw)
        spec = apply_overrides(copy.deepcopy(spec), args.part_set)
        if args.what == "baselines":
            cfg["defense"] = {"clean_fraction": raw["defense"]["clean_fraction"], **spec}
        else:
            cfg["defense"]["detector" if args.what == "figure7" else "unlearner"] = spec
        cfg["name"] = f"{args.what}-{cfg['attack']['name']}-{label(spec)}"
        t0 = time.perf_counter()
        rec = run_experiment(build_experiment(cfg), store)
        took = time.perf_counter() - t0
        f = rec.final_metrics
        print(f"{spec}: {took:.0f} s; CA {f.get('clean_acc', float('nan')):.4f} ASR {f.get('asr', float('nan')):.4f} "
              f"P {f.get('iso_precision', float('nan')):.3f} AUPRC {f.get('iso_auprc', float('nan')):.3f}", flush=True)
        records.append(rec)
    if args.what == "table8" and records:
        first = records[0].metrics
        stage = sum(first.get(p, {}).get("stage_s", 0.0) for p in ("isolation", "recovery"))
        hits = [r for r in records if r.metrics.get("isolation", {}).get("stage_hit") == 1.0]
        total = sum(r.wall_s or 0.0 for r in records)
        print(f"\nshared isolation + recovery: trained once in {stage:.0f} s, reused by {len(hits)} runs; "
              f"{len(records)} runs took {total:.0f} s, training the stage in each would add {stage * len(hits):.0f} s "
              f"({(total + stage * len(hits)) / max(total, 1e-9):.1f}x)")
    path = write_report(store, [r.run_id for r in records], out, title=f"abl {args.what} on a CIFAR-10 slice")
    print("\n".join(comparison_sections(records, out)))
    print(f"report: {path}")


if __name__ == "__main__":
    main()

"""ABL's presets side by side on the CIFAR-10 slice of the CI tests, with their schedule.

Runs ABL ``default``, ``paper`` and ``official`` (and optionally no defense) on the
5,000-image CIFAR-10 slice, BadNets 10%, WRN-16-1, with the epoch counts of
``tests/slice_schedule.py`` (isolation 12, recovery 8, unlearning 3 at batch 64) and every
other value from the preset, and prints CA, ASR and isolation precision after each stage.

    python benchmarks/slice_presets.py --presets paper official --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from abl.experiment import build_experiment, run_experiment  # noqa: E402
from abl.store import RunStore  # noqa: E402
from slice_schedule import ABL_DEFAULT_SLICE, NONE_SAME_LENGTH, SLICE_TRAIN  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["default", "paper", "official"],
                    choices=["none", "default", "paper", "official"])
    ap.add_argument("--root", default=str(REPO / ".cache" / "test-data" / "cifar10-jpeg"))
    ap.add_argument("--runs-dir", default=str(REPO / ".cache" / "slice-presets"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    store = RunStore(args.runs_dir)
    print("| run | CA | ASR | isolation precision | after isolation | after recovery | after unlearning | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        defense = dict(NONE_SAME_LENGTH) if preset == "none" else {**ABL_DEFAULT_SLICE, "preset": preset}
        raw = {
            "name": f"slice-{preset}", "seed": 0,
            "dataset": {"name": "cifar10", "root": args.root},
            "model": {"name": "wrn", "depth": 16, "widen": 1},
            "attack": {"name": "badnets", "rate": 0.1, "target": 0},
            "defense": defense,
            "slice": {"train": 5000, "test": 2000, "seed": 0},
            "train": {**SLICE_TRAIN, "threads": args.threads},
            "output": {"runs_dir": args.runs_dir, "cache_dir": str(REPO / ".cache" / "test-cache"), "save_model": False},
        }
        rec = run_experiment(build_experiment(raw), store)
        m = rec.metrics

        def stage(p: str) -> str:
            return f"{m[p]['clean_acc']:.1%} / {m[p]['asr']:.1%}" if p in m else "–"

        f = m["final"]
        iso = f"{f['iso_precision']:.0%}" if "iso_precision" in f else "–"
        print(f"| {preset} | {f['clean_acc']:.1%} | {f['asr']:.1%} | {iso} | {stage('isolation')} | "
              f"{stage('recovery')} | {stage('unlearning')} | {rec.wall_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()

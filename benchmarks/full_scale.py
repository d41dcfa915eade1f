"""The paper's CIFAR-10 BadNets setting at full scale: no defense and ABL's three presets.

Li et al., "Anti-Backdoor Learning" (NeurIPS 2021), appendix A.2/A.3: 50,000 CIFAR-10
training images, BadNets 10% to target 0, WRN-16-1, 100 epochs. Four runs: no defense
(lr 0.1, /10 at epochs 20 and 70), ABL ``paper``, ``official`` and ``default``. Prints and
optionally writes into ``benchmarks/README.md`` one table: CA, ASR, isolation precision
after isolation, CA/ASR after every stage and wall time per stage, with the device.

    python benchmarks/full_scale.py --root data/cifar10 --jobs 4 --write-readme   # GPU
    python benchmarks/full_scale.py --root .cache/test-data/cifar10-jpeg --train 5000 --epochs-scale 0.2

On CUDA the engine trains in bf16 autocast with channels-last tensors; ``--compile`` adds
``torch.compile``. WRN-16-1 leaves an H200 mostly idle (about 7 ms of per-step overhead for
128 images), so ``--jobs 4`` runs the four in parallel processes sharing the GPU: 6.3 min
for the slowest but ``official`` there, against about 5 min for one run alone
(benchmarks/README.md). The authors report ASR 3.04%, CA 86.11% for this setting.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abl.defenses import DEFENSES  # noqa: E402
from abl.experiment import build_experiment, run_experiment  # noqa: E402
from abl.store import RunStore  # noqa: E402

BEGIN, END = "<!-- full_scale:begin -->", "<!-- full_scale:end -->"
RUNS = ("none", "paper", "official", "default")


def _scaled(n: int, scale: float) -> int:
    return max(1, int(math.ceil(n * scale))) if n else 0


def defense_spec(run: str, scale: float) -> dict[str, Any]:
    """The defense config of ``run``, its epoch counts multiplied by ``scale`` (>= 1 each)."""
    if run == "none":
        return {"name": "none", "epochs": _scaled(100, scale), "lr": 0.1,
                "milestones": [_scaled(20, scale), _scaled(70, scale)]}
    preset = DEFENSES.create({"name": "abl", "preset": run})
    spec: dict[str, Any] = {"name": "abl", "preset": run}
    if scale != 1.0:
        recovery = _scaled(preset.recovery_epochs, scale)
        spec.update(
            isolation_epochs=_scaled(preset.isolation_epochs, scale),
            recovery_epochs=recovery,
            # a milestone scaled onto the phase's end would never act (and is refused)
            recovery_milestones=[m for m in (_scaled(m, scale) for m in preset.recovery_milestones) if m < recovery],
            unlearning_epochs=_scaled(preset.unlearning_epochs, scale),
        )
        if preset.ranking == "eval":
            spec["rank_epochs"] = 1
    return spec


def experiment(args: argparse.Namespace, run: str) -> dict[str, Any]:
    return {
        "name": f"full-scale-{run}",
        "seed": args.seed,
        "dataset": {"name": "cifar10", "root": args.root, "download": args.download},
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": {"name": "badnets", "rate": 0.1, "target": 0},
        "defense": defense_spec(run, args.epochs_scale),
        "slice": {"train": args.train, "test": args.test, "seed": 0},
        "train": {
            "batch_size": 128, "eval_batch_size": args.eval_batch_size, "compile": args.compile,
            "progress": args.progress, "eval_every": args.eval_every, "threads": args.threads,
        },
        "output": {"runs_dir": str(args.runs_dir), "cache_dir": args.cache_dir, "save_model": False},
    }


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def row(run: str, metrics: dict[str, dict[str, float]], wall: float) -> str:
    final = metrics.get("final", {})
    iso = metrics.get("isolation", {})
    stages = []
    for phase in ("isolation", "recovery", "unlearning"):
        m = metrics.get(phase)
        if m:
            stages.append(f"{phase[:3]} {_pct(m.get('clean_acc'))} / {_pct(m.get('asr'))} ({_secs(m.get('stage_s'))} s)")
    count = iso.get("iso_count")
    return (f"| {run} | {_pct(final.get('clean_acc'))} | {_pct(final.get('asr'))} | "
            f"{'–' if count is None else f'{count:.0f}'} | {_pct(iso.get('iso_precision'))} | "
            f"{iso.get('iso_separation', float('nan')):.1f} | {'; '.join(stages) or '–'} | {wall:.0f} |")


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def table(rows: list[str], args: argparse.Namespace, total: float) -> str:
    scale = "full scale" if args.train is None and args.epochs_scale == 1.0 else (
        f"slice: {args.train or 'all'} train / {args.test or 'all'} test images, epochs x{args.epochs_scale}")
    head = [
        f"{date.today().isoformat()}, {device_name()}, {scale}; total {total / 60:.1f} min.",
        f"Command: `python benchmarks/full_scale.py {' '.join(args.argv)}`",
        "",
        "| run | CA | ASR | isolated | isolation precision | isolation separation | CA / ASR after each stage (stage time) "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def write_readme(path: Path, text: str) -> None:
    """Replace the table between the markers in ``path`` (appending the section if absent)."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## Full scale (`full_scale.py`)\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def _child_argv(args: argparse.Namespace, run: str, out: Path) -> list[str]:
    """The command line of one run in a child process (no README writing, no nested jobs)."""
    a = ["--root", args.root, "--runs-dir", str(args.runs_dir), "--epochs-scale", repr(args.epochs_scale),
         "--eval-batch-size", str(args.eval_batch_size), "--eval-every", str(args.eval_every),
         "--threads", str(args.threads), "--seed", str(args.seed), "--runs", run, "--row-json", str(out)]
    for flag, value in (("--train", args.train), ("--test", args.test), ("--cache-dir", args.cache_dir)):
        if value is not None:
            a += [flag, str(value)]
    for flag, on in (("--download", args.download), ("--compile", args.compile), ("--progress", args.progress)):
        if on:
            a.append(flag)
    return a


def run_parallel(args: argparse.Namespace) -> list[str]:
    """Each run in its own process, ``args.jobs`` at a time; rows in ``args.runs`` order."""
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        outs = {run: Path(tmp) / f"{run}.json" for run in args.runs}
        pending, active = list(args.runs), {}
        while pending or active:
            while pending and len(active) < args.jobs:
                run = pending.pop(0)
                active[run] = subprocess.Popen([sys.executable, script, *_child_argv(args, run, outs[run])])
            time.sleep(0.5)
            for run, proc in list(active.items()):
                if proc.poll() is not None:
                    del active[run]
                    if proc.returncode != 0:
                        for other in active.values():
                            other.kill()
                        raise SystemExit(f"full_scale: run '{run}' failed (exit {proc.returncode})")
        return [json.loads(outs[run].read_text())[0] for run in args.runs]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/cifar10", help="CIFAR-10 root (batches or image folders)")
    ap.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 when absent")
    ap.add_argument("--train", type=int, default=None, help="training slice (default: all 50,000)")
    ap.add_argument("--test", type=int, default=None, help="test slice (default: all 10,000)")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every epoch count (CPU checks)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--runs-dir", type=Path, default=REPO / ".cache" / "full-scale-runs")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--eval-batch-size", type=int, default=4096)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--write-readme", nargs="?", const=str(REPO / "benchmarks" / "README.md"), default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (they share the GPU)")
    ap.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)  # a child's rows, for --jobs
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # recorded in the table
    if not 0 < args.epochs_scale <= 1:
        ap.error("--epochs-scale must be in (0, 1]")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    t_all = time.perf_counter()
    if args.jobs > 1 and len(args.runs) > 1:
        rows = run_parallel(args)
    else:
        store = RunStore(args.runs_dir)
        rows = []
        for run in args.runs:
            rec = run_experiment(build_experiment(experiment(args, run)), store)
            rows.append(row(run, rec.metrics, rec.wall_s or 0.0))
            print(rows[-1], flush=True)
        if args.row_json:
            args.row_json.write_text(json.dumps(rows))
    text = table(rows, args, time.perf_counter() - t_all)
    print(text)
    if args.write_readme:
        write_readme(Path(args.write_readme), text)
    return text


if __name__ == "__main__":
    main()

"""Grid throughput of ``abl sweep`` with 1 and 2 concurrent workers, side by side in one
process, and the work a grid's shared stage saved (issue 12).

    python benchmarks/sweep_throughput.py throughput --out /tmp/sweep-bench
    python benchmarks/sweep_throughput.py stages --runs-dir RUNS   # a store with a Table 8 grid

``throughput`` runs the digits grid of ``configs/grids/digits-attacks.yaml`` (4 cells of the default
ABL, shortened, x ``--seeds``) on a local Ray with ``--num-cpus`` CPUs, first one cell at a
time, then two, each into a fresh store, and prints the wall time and cells per minute.
``stages`` reads the ABL runs of a store that share one cached isolation (``cache_stages``):
the seconds the cell that computed it spent on isolation and recovery, how many cells read it
instead, and how long they took to load it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from abl.store import RunStore
from abl.sweep import load_grid, run_sweep

REPO = Path(__file__).resolve().parents[1]


def throughput(args: argparse.Namespace) -> None:
    grid = load_grid(REPO / "configs" / "grids" / "digits-attacks.yaml", seeds=args.seeds)
    n = len(grid.cells())
    rows = []
    for workers in args.workers:
        runs = Path(args.out) / f"runs-{workers}"
        shutil.rmtree(runs, ignore_errors=True)
        t0 = time.perf_counter()
        result = run_sweep(grid, runs, num_cpus=args.num_cpus, max_concurrent=workers, progress=lambda _: None)
        wall = time.perf_counter() - t0
        assert not result.failed, result.failed
        cell_s = sum(r.wall_s or 0.0 for r in result.records.values()) / max(1, len(result.records))
        rows.append((workers, wall, 60 * n / wall, cell_s))
    print(f"grid: {n} cells (configs/grids/digits-attacks.yaml x {args.seeds} seeds), local Ray with {args.num_cpus} CPUs, "
          "one torch thread per cell")
    print("| concurrent cells | wall (s) | cells per minute | mean run wall (s) | speed-up |")
    print("|---|---|---|---|---|")
    for workers, wall, rate, cell_s in rows:
        print(f"| {workers} | {wall:.1f} | {rate:.1f} | {cell_s:.1f} | {rows[0][1] / wall:.2f}x |")


def stages(args: argparse.Namespace) -> None:
    recs = [r for r in RunStore(args.runs_dir).list_runs(status="finished") if "isolation" in r.metrics
            and "stage_hit" in r.metrics["isolation"]]
    made = [r for r in recs if r.metrics["isolation"]["stage_hit"] == 0.0]
    read = [r for r in recs if r.metrics["isolation"]["stage_hit"] == 1.0]
    if not made:
        raise SystemExit(f"no run in {args.runs_dir} computed a cached isolation (cache_stages)")
    cost = sum(m["isolation"].get("stage_s", 0.0) + m.get("recovery", {}).get("stage_s", 0.0)
               for m in (r.metrics for r in made)) / len(made)
    load = sum(r.metrics["isolation"].get("stage_load_s", 0.0) for r in read) / max(1, len(read))
    total = sum(r.wall_s or 0.0 for r in recs)
    print(f"{len(made)} run(s) computed the isolation + recovery stage ({cost:.0f} s each); {len(read)} read it "
          f"({load:.2f} s each). Saved: {len(read) * cost:.0f} s of {total + len(read) * cost:.0f} s "
          f"({100 * len(read) * cost / (total + len(read) * cost):.0f}% of the grid's training time).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--out", default="/tmp/sweep-bench")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.set_defaults(func=throughput)
    p = sub.add_parser("stages")
    p.add_argument("--runs-dir", required=True)
    p.set_defaults(func=stages)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

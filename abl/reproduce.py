"""``abl reproduce TABLE``: the ABL paper's appendix tables from one command.

Each table is a grid run through :func:`abl.sweep.run_sweep` (so it is resumable, shares
stages and scales over a Ray cluster), then written as Markdown with our numbers beside the
paper's (:mod:`abl.paper`, copied from the appendix of Li et al., NeurIPS 2021), the
difference, the scale and the device, and a PNG of the same comparison.

Scales:

- ``full``: the paper's setting (appendix A.2/A.3): all 50,000 CIFAR-10 images, WRN-16-1,
  the ``paper`` preset of ABL (isolation 20 epochs, recovery 60, GGA 20), no-defense
  baselines of 100 epochs (lr /10 at 20 and 70).
- ``slice``: for a CPU in minutes per cell: 5,000 training and 2,000 test images (seed 0),
  batch 64, and the schedule of the CPU slice tests (``tests/slice_schedule.py``): the
  turning epoch 20 becomes 12 (other turning epochs scale by 0.6), recovery 60 becomes 8
  (lr /10 at 6), 20-epoch unlearning or fine-tuning becomes 5, 100-epoch trainings 23 (lr
  /10 at 16). Nothing else changes. Numbers at this scale are not the paper's and are not
  meant to match it; they show whether each part does its job on little data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from abl import paper
from abl.errors import ConfigError
from abl.sweep import Grid, SweepResult, fmt_stat, group_stats, run_sweep

SCALES = ("slice", "full")
FIGURES_MISSING = {
    "figure6": "the training-loss curves of 6 attacks: run one config per attack and `abl report --out` (per-run plots)",
    "figure7": "detection precision of 5 detectors: configs/cifar10-badnets-figure7.yaml, one run per detector",
    "figure8": "isolation precision/recall against the isolation rate: configs/cifar10-badnets-figure8-9.yaml",
    "figure9": "ABL against the isolation rate: configs/cifar10-badnets-figure8-9.yaml",
}
TABLES_MISSING = {
    "table9": "timing of isolation on the authors' machine: benchmarks/full_scale.py records ours per stage",
}


@dataclass
class Entry:
    """One cell of a paper table: where it sits (row, column), the config values that make it,
    and the paper's figures for it (metric -> percent)."""

    row: str
    col: str
    values: dict[str, Any]
    paper: dict[str, float]
    skip: str | None = None  # why it is not run (e.g. an input file that was not given)

    @property
    def key(self) -> str:
        return f"{self.row}/{self.col}"


@dataclass
class Context:
    scale: str
    roots: dict[str, str] = field(default_factory=dict)
    trojan_trigger: str | None = None

    @property
    def slice(self) -> bool:
        return self.scale == "slice"

    def epochs(self, full: int) -> int:
        """A schedule length at this scale (see the module docstring)."""
        if not self.slice:
            return full
        return {20: 12, 60: 8, 100: 23}.get(full, max(1, round(0.6 * full)))

    def finetune_epochs(self, full: int) -> int:
        return full if not self.slice else max(1, round(full / 4))

    def dataset(self, name: str) -> dict[str, Any]:
        root = self.roots.get(name, f"data/{name}")
        return {"name": name, "root": root, "download": name in ("cifar10", "gtsrb")}


@dataclass
class TableSpec:
    name: str
    title: str
    source: str
    metrics: tuple[str, ...]
    row_label: str
    col_label: str
    build: Callable[[Context], tuple[dict[str, Any], list[Entry]]]


ATTACK_LABELS = {"badnets": "BadNets", "trojan": "Trojan", "blend": "Blend", "dynamic": "Dynamic", "sig": "SIG", "cl": "CL"}


def _attack(name: str, ctx: Context, rate: float = 0.1) -> tuple[dict[str, Any] | None, str | None]:
    """The paper's CIFAR-10 setting of each attack (appendix A.2, Table 5; the repo's
    configs/cifar10-*-abl.yaml), or why it cannot run."""
    if name == "trojan":
        if not ctx.trojan_trigger:
            return None, "Trojan needs the authors' trigger file: pass --trojan-trigger PATH"
        return {"name": "trojan", "rate": rate, "target": 0, "trigger_file": ctx.trojan_trigger}, None
    if name == "sig":
        return {"name": "sig", "rate": rate, "rate_of": "target_class", "target": 0, "delta": 20, "frequency": 6}, None
    if name == "cl":
        return {"name": "cl", "rate": rate, "rate_of": "dataset", "target": 0, "eps": 16 / 255, "corners": 4}, None
    if name == "dynamic":
        spec = {"name": "dynamic", "rate": rate, "target": 0, "surrogate_model": "preact_resnet18"}
        spec.update(surrogate_epochs=600 if not ctx.slice else 30, mask_epochs=25 if not ctx.slice else 5)
        return spec, None
    return {"name": name, "rate": rate, "target": 0}, None


def _base(ctx: Context, name: str) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "dataset": ctx.dataset("cifar10"),
        "model": {"name": "wrn", "depth": 16, "widen": 1},
        "attack": {"name": "badnets", "rate": 0.1, "target": 0},
        "train": {"batch_size": 128, "progress": False},
    }
    if ctx.slice:
        base["slice"] = {"train": 5000, "test": 2000, "seed": 0}
        base["train"] = {"batch_size": 64, "progress": False, "eval_every": 0, "eval_subset": 0}
    return base


def _abl_paper(ctx: Context, turning: int = 20) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "abl", "preset": "paper"}
    if ctx.slice:
        spec.update(isolation_epochs=ctx.epochs(turning), recovery_epochs=8, recovery_milestones=[6],
                    unlearning_epochs=ctx.finetune_epochs(20))
    elif turning != 20:
        spec["isolation_epochs"] = turning
    return spec


def _no_defense(ctx: Context) -> dict[str, Any]:
    return {"name": "none", "epochs": ctx.epochs(100), "lr": 0.1, "milestones": [16] if ctx.slice else [20, 70]}


def _table6(ctx: Context) -> tuple[dict[str, Any], list[Entry]]:
    entries = []
    for turning, row in paper.TABLE6.items():
        for atk, (asr, ca) in row.items():
            spec, skip = _attack(atk, ctx)
            entries.append(Entry(str(turning), ATTACK_LABELS[atk], {"attack": spec, "defense": _abl_paper(ctx, turning)},
                                 {"asr": asr, "clean_acc": ca}, skip))
    return _base(ctx, "table6"), entries


def _table7(ctx: Context) -> tuple[dict[str, Any], list[Entry]]:
    entries = []
    names = {"cifar10": "CIFAR-10", "gtsrb": "GTSRB", "imagenet_subset": "ImageNet subset"}
    for ds, row in paper.TABLE7.items():
        for gamma, precision in row.items():
            # GTSRB: target 1 and lr 0.01 (appendix A.2)
            lr = 0.01 if ds == "gtsrb" else 0.1
            detector = {"name": "lga_batch", "gamma": gamma, "epochs": ctx.epochs(20), "lr": lr}
            values: dict[str, Any] = {"defense": {"name": "detect", "detector": detector, "rate": 0.01}}
            skip = None
            if ds == "gtsrb":
                values["dataset"] = ctx.dataset("gtsrb")
                values["attack"] = {"name": "badnets", "rate": 0.1, "target": 1}
            elif ds == "imagenet_subset":
                skip = "the paper's 12-class ImageNet subset (224 px, ResNet-34) is not wired into reproduce yet"
            entries.append(Entry(names[ds], f"gamma {gamma}", values, {"iso_precision": precision}, skip))
    return _base(ctx, "table7"), entries


def _table8(ctx: Context) -> tuple[dict[str, Any], list[Entry]]:
    base = _base(ctx, "table8")
    # one isolation and recovery for every unlearner, computed by the first cell that gets
    # there and read by the others (stage cache, locked across workers)
    abl = {**_abl_paper(ctx), "cache_stages": True}
    entries = [Entry("Backdoored", "(no defense)", {"defense": _no_defense(ctx)},
                     {"asr": paper.TABLE8_BACKDOORED["asr"], "clean_acc": paper.TABLE8_BACKDOORED["clean_acc"]})]
    for name, row in paper.TABLE8.items():
        if name == "gga":  # the paper's GGA: 20 epochs at 1e-4 on the isolated examples
            unl: dict[str, Any] = {"name": "gga", "epochs": ctx.finetune_epochs(20), "lr": 0.0001, "epoch": "isolated",
                                   "ceiling": None, "holdout": 0.0, "select": "last", "patience": 0}
        elif name == "retrain":
            unl = {"name": name, "epochs": ctx.epochs(100), "milestones": [16] if ctx.slice else [20, 70]}
        elif name == "self_learning":
            unl = {"name": name, "epochs": ctx.finetune_epochs(20), "teacher_epochs": ctx.epochs(100),
                   "teacher_milestones": [16] if ctx.slice else [20, 70]}
        else:
            unl = {"name": name, "epochs": ctx.finetune_epochs(20)}
        skip = None
        if name == "finetune_imagenet" and ctx.slice:
            skip = "ImageNet-pretrained ResNet-34 weights (a download) and its cost: full scale only"
        entries.append(Entry(str(row["label"]), str(row["type"]), {"defense": {**abl, "unlearner": unl}},
                             {"asr": float(row["asr"]), "clean_acc": float(row["clean_acc"])}, skip))
    return base, entries


def _table10(ctx: Context) -> tuple[dict[str, Any], list[Entry]]:
    entries = []
    for kind, label in (("baseline", "Baseline"), ("abl", "ABL")):
        for atk, (asr, ca) in paper.TABLE10[kind].items():
            spec, skip = _attack(atk, ctx, rate=0.01)
            defense = _no_defense(ctx) if kind == "baseline" else _abl_paper(ctx)
            entries.append(Entry(label, ATTACK_LABELS[atk], {"attack": spec, "defense": defense},
                                 {"asr": asr, "clean_acc": ca}, skip))
    return _base(ctx, "table10"), entries


def _table11(ctx: Context) -> tuple[dict[str, Any], list[Entry]]:
    entries = []
    schedule = {"epochs": ctx.epochs(100), "milestones": [16] if ctx.slice else [20, 70]}
    for kind, label in (("baseline", "Baseline"), ("nc_abl", "NC + ABL unlearning")):
        for atk, (asr, ca) in paper.TABLE11[kind].items():
            spec, skip = _attack(atk, ctx)
            if kind == "baseline":
                defense: dict[str, Any] = _no_defense(ctx)
            else:  # 500 clean images with the reversed trigger, the paper's GGA (B.10)
                defense = {"name": "neural_cleanse", "backdoor": schedule, "stamp_count": 500,
                           "unlearner": {"name": "gga", "epochs": ctx.finetune_epochs(20), "lr": 0.0001,
                                         "epoch": "isolated", "ceiling": None, "holdout": 0.0, "select": "last",
                                         "patience": 0}}
            entries.append(Entry(label, ATTACK_LABELS[atk], {"attack": spec, "defense": defense},
                                 {"asr": asr, "clean_acc": ca}, skip))
    return _base(ctx, "table11"), entries


TABLES: dict[str, TableSpec] = {
    "table6": TableSpec("table6", "ABL by turning epoch", paper.TABLE6_SOURCE, ("asr", "clean_acc"),
                        "turning epoch", "attack", _table6),
    "table7": TableSpec("table7", "Isolation precision of the 1% isolated by the LGA threshold gamma",
                        paper.TABLE7_SOURCE, ("iso_precision",), "dataset", "gamma", _table7),
    "table8": TableSpec("table8", "Unlearning methods on one ABL isolation (BadNets)", paper.TABLE8_SOURCE,
                        ("asr", "clean_acc"), "method", "type", _table8),
    "table10": TableSpec("table10", "ABL at 1% poisoning", paper.TABLE10_SOURCE, ("asr", "clean_acc"),
                         "defense", "attack", _table10),
    "table11": TableSpec("table11", "ABL unlearning on Neural Cleanse's reversed trigger", paper.TABLE11_SOURCE,
                         ("asr", "clean_acc"), "defense", "attack", _table11),
}


@dataclass
class Reproduction:
    spec: TableSpec
    entries: list[Entry]
    grid: Grid
    result: SweepResult
    markdown: str
    table_path: Path
    figure_path: Path | None


def plan(table: str, scale: str, ctx: Context, rows: list[str] | None = None,
         seeds: int | None = None, overrides: list[str] | None = None) -> tuple[TableSpec, list[Entry], Grid]:
    """The table's entries and the grid that runs them (nothing is run)."""
    if table not in TABLES:
        known = ", ".join(list(TABLES) + list(TABLES_MISSING) + list(FIGURES_MISSING))
        if table in TABLES_MISSING or table in FIGURES_MISSING:
            why = {**TABLES_MISSING, **FIGURES_MISSING}[table]
            raise ConfigError(f"{table} is not reproduced by `abl reproduce` yet ({why})")
        raise ConfigError(f"unknown table '{table}'; choose from {', '.join(TABLES)} (known: {known})")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; use slice or full")
    spec = TABLES[table]
    base, entries = spec.build(ctx)
    if rows:
        unknown = sorted(set(rows) - {e.row for e in entries})
        if unknown:
            raise ConfigError(f"{table} has no row '{unknown[0]}'; its rows: {', '.join(dict.fromkeys(e.row for e in entries))}")
        entries = [e for e in entries if e.row in rows]
    runnable = [e for e in entries if e.skip is None]
    if not runnable:
        raise ConfigError(f"{table}: nothing to run ({'; '.join(sorted({e.skip for e in entries if e.skip}))})")
    grid = Grid(f"{table}-{scale}", base, [], list(range(seeds)) if seeds else None, list(overrides or []),
                variants=[(e.key, e.values) for e in runnable])
    return spec, entries, grid


def _sizes(result: SweepResult) -> str:
    """The data actually used, from the runs' recorded configs (``--set`` may change it)."""
    sizes = set()
    for rec in result.records.values():
        sl = rec.config.get("slice") or {}
        sizes.add("all images" if sl.get("train") is None else f"{sl['train']:,} training / "
                  f"{'all' if sl.get('test') is None else format(sl['test'], ',')} test images")
    return f" ({'; '.join(sorted(sizes))})" if sizes else ""


def render(spec: TableSpec, entries: list[Entry], grid: Grid, result: SweepResult, scale: str,
           command: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The Markdown table (ours, paper, difference per metric) and the stats per entry."""
    from abl.report import METRIC_LABELS

    rows = group_stats(result.cells, result.records, spec.metrics)
    by_entry = {r["axes"]["variant"]: r for r in rows}
    devices = sorted({str(rec.config.get("device", "?")) for rec in result.records.values()})
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [spec.row_label, spec.col_label]
    for m in spec.metrics:
        label = METRIC_LABELS.get(m, m)
        head += [f"{label} (ours)", f"{label} (paper)", "Δ"]
    lines = [
        f"# {spec.name}: {spec.title}", "",
        f"Paper: {spec.source}. Scale: **{scale}**{_sizes(result)}. Device: {', '.join(devices) or '–'}. Seeds per cell: {len(grid.seeds) if grid.seeds else 1}. "
        f"Written {stamp} by `{command}`. Values in percent; Δ = ours − paper.", "",
        "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
    ]
    for e in entries:
        cells = [e.row, e.col]
        stats = by_entry.get(e.key, {})
        for m in spec.metrics:
            ours = stats.get(m) if e.skip is None else None
            cells += [fmt_stat(ours, with_n=True) if e.skip is None else "not run", f"{e.paper[m]:.2f}",
                      f"{ours['mean'] - e.paper[m]:+.2f}" if ours else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [e for e in entries if e.skip]
    if skipped:
        grouped: dict[tuple[str, str], list[str]] = {}
        for e in skipped:
            grouped.setdefault((e.row, str(e.skip)), []).append(e.col)
        lines += ["", "Not run:"] + [f"- {row} ({', '.join(cols)}): {why}" for (row, why), cols in grouped.items()]
    if result.failed:
        lines += ["", f"{len(result.failed)} cell(s) failed; rerun the same command to retry them."]
    return "\n".join(lines) + "\n", by_entry


def plot(spec: TableSpec, entries: list[Entry], by_entry: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Ours beside the paper's, one panel per metric, one pair of bars per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abl.report import METRIC_LABELS

    shown = [e for e in entries if e.skip is None]
    if not shown:
        return None
    fig, axes = plt.subplots(len(spec.metrics), 1, figsize=(max(6.0, 0.55 * len(shown) + 2), 3.2 * len(spec.metrics)),
                             squeeze=False)
    xs = list(range(len(shown)))
    for ax, m in zip(axes[:, 0], spec.metrics):
        ours = [by_entry.get(e.key, {}).get(m) for e in shown]
        ax.bar([x - 0.2 for x in xs], [o["mean"] if o else math.nan for o in ours], 0.4, label="ours",
               yerr=[o["sd"] if o else 0.0 for o in ours], color="#2c7bb6")
        ax.bar([x + 0.2 for x in xs], [e.paper[m] for e in shown], 0.4, label="paper", color="#bbbbbb")
        ax.set_ylabel(f"{METRIC_LABELS.get(m, m)} (%)")
        ax.set_ylim(0, 105)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{e.row}\n{e.col}" for e in shown], fontsize=7, rotation=45, ha="right")
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"{spec.name}: {spec.title}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reproduce(table: str, scale: str, ctx: Context, runs_dir: str | Path, out_dir: str | Path, *,
              rows: list[str] | None = None, seeds: int | None = None, overrides: list[str] | None = None,
              command: str = "abl reproduce", progress: Callable[[str], None] = print, **sweep: Any) -> Reproduction:
    """Run (or finish) the table's grid and write ``<out>/<table>-<scale>.md`` and ``.png``."""
    spec, entries, grid = plan(table, scale, ctx, rows, seeds, overrides)
    result = run_sweep(grid, runs_dir, progress=progress, **sweep)
    markdown, by_entry = render(spec, entries, grid, result, scale, command)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / f"{table}-{scale}.md"
    figure = plot(spec, entries, by_entry, out / f"{table}-{scale}.png")
    if figure is not None:
        markdown += f"\n![{table}]({figure.name})\n"
    table_path.write_text(markdown, encoding="utf-8")
    return Reproduction(spec, entries, grid, result, markdown, table_path, figure)


def parse_roots(items: list[str]) -> dict[str, str]:
    """``--root cifar10=PATH`` options -> {dataset: absolute path}."""
    roots = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in ("cifar10", "gtsrb") or not path:
            raise ConfigError(f"--root '{item}' must look like cifar10=PATH or gtsrb=PATH")
        roots[name] = str(Path(path).expanduser().absolute())
    return roots



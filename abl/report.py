"""Tables and plots built from the results store, never from inside a training loop.

:func:`runs_table` renders a Markdown comparison table of runs; :func:`write_report`
writes ``report.md`` with that table and, per run, its phase metrics and up to three
figures:

* ``<run>-loss.png``: per-example training loss of poisoned vs clean examples over
  epochs (mean and 10-90 percentile band, log scale), as in Figure 6 of the ABL paper;
  from the arrays ``example_losses`` (E, N) and ``poison_mask`` (N,).
* ``<run>-curves.png``: clean accuracy and ASR per epoch, from ``history.jsonl``.
* ``<run>-attack-examples.png``: clean training images above the same images triggered
  (and the style domain), when the attack stored ``examples_*`` with its trigger (DFST).
* ``<run>-isolated.png``: the isolated examples (green border: truly poisoned, red: not),
  from ``isolated_images`` / ``isolated_is_poison`` / ``isolated_indices``, plus
  ``<run>-isolated.csv``.

A figure whose inputs are absent is replaced by one line saying so. Runs that did not
finish are listed with their status and never with metrics.

Example::

    write_report(RunStore("runs"), ["20261126-0435"], Path("reports/badnets"))
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from abl.errors import AblError, StoreError
from abl.store import FINISHED, RunRecord, RunStore

MISSING = "–"
RATE_METRICS = ("clean_acc", "clean_acc_nontarget", "asr", "robust_acc", "iso_precision", "iso_recall", "iso_auprc",
                "iso_top_label_share", "iso_fit_before", "iso_fit_after", "iso_heldout_fit_before",
                "iso_heldout_fit_after", "fit_clean_acc", "fit_backdoor_acc", "fit_cross_acc", "control_asr")
METRIC_LABELS = {
    "clean_acc": "CA",
    "asr": "ASR",
    "robust_acc": "RA",
    "iso_precision": "Isolation precision",
    "iso_recall": "Isolation recall",
    "clean_acc_nontarget": "CA (non-target)",
    "iso_separation": "Isolation separation",
    "iso_top_label_share": "Isolated top-label share",
    "iso_weak": "Weak isolation",
    "iso_fit_before": "Isolated fitted (before)",
    "iso_fit_after": "Isolated fitted (after)",
    "iso_heldout_fit_before": "Held-out suspects fitted (before)",
    "iso_heldout_fit_after": "Held-out suspects fitted (after)",
    "iso_heldout_count": "Held-out suspects",
    "unlearn_epochs_run": "Unlearning epochs run",
    "unlearn_epoch_kept": "Unlearning epoch kept",
    "unlearn_weak": "Weak unlearning",
    "poison_s": "Poisoning time",
    "stage_s": "Stage time",
    "rank_s": "Ranking time",
    "iso_count": "Isolated examples",
    "iso_auprc": "Isolation AUPRC",
    "stage_hit": "Stage from cache",
    "stage_load_s": "Stage load time",
    "scores_hit": "Isolation scores from cache",
    "iso_evidence": "Backdoor evidence",
    "recheck_count": "Added by the second look",
    "recheck_precision": "Second look precision",
    "recheck_recall": "Second look recall",
    "recheck_threshold": "Second look loss threshold",
    "recheck_settled": "Second look run",
    "count_threshold": "Isolation count threshold",
    "scores_load_s": "Isolation scores load time",
    "control_asr": "ASR (clean model)",
    "n_poison": "Poisoned examples",
    "removed": "Examples removed",
}
DEFAULT_COLUMNS = ["run", "dataset", "model", "attack", "defense", "status",
                   "clean_acc", "asr", "robust_acc", "iso_precision", "iso_recall", "wall_s"]
MAX_TILES = 64
_POISON_RGB = (0, 170, 0)
_CLEAN_RGB = (215, 25, 28)
_UNKNOWN_RGB = (128, 128, 128)


# ----------------------------------------------------------------------------- formatting
#
# One number format in every table and line the report prints: rates as percents with two
# decimals (``93.12%``), seconds with one (``812.4 s``), counts as integers, flags as yes/no,
# any other number with two decimals.

#: metrics that count something (shown as integers)
COUNT_METRICS = ("iso_count", "recheck_count", "iso_heldout_count", "unlearn_epochs_run", "unlearn_epoch_kept", "n_poison", "removed")
#: metrics that are 0/1 flags (shown as yes / no)
FLAG_METRICS = ("iso_weak", "unlearn_weak", "stage_hit", "scores_hit", "iso_evidence", "recheck_settled")


def fmt_rate(value: float | None) -> str:
    """A fraction as a percent with 2 decimals: 0.9312 -> ``93.12%``; None -> ``–``."""
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isnan(value):
        return MISSING  # e.g. isolation precision of a run with no ground truth
    return f"{100.0 * value:.2f}%"


def fmt_seconds(value: float | None) -> str:
    """Seconds with 1 decimal: ``812.4 s``; None -> ``–``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.1f} s"


def fmt_number(value: float | None) -> str:
    """A count as an integer (``12``), any other number with 2 decimals (``8.31``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}"


def fmt_metric(name: str, value: float | None) -> str:
    """A metric in the report's one format, chosen by its name."""
    if name in RATE_METRICS:
        return fmt_rate(value)
    if name.endswith("_s"):
        return fmt_seconds(value)
    if name in FLAG_METRICS and value is not None and not _is_nan(value):
        return "yes" if value else "no"
    if name in COUNT_METRICS and value is not None and not _is_nan(value):
        return str(int(round(value)))
    return fmt_number(value)


def plural(count: float, noun: str, nouns: str | None = None) -> str:
    """``1 suspect``, ``3 suspects`` (``nouns``: an irregular plural)."""
    n = int(round(count))
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


def _md(text: Any) -> str:
    """Make a value safe for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[RunRecord], str]


def _finished_only(fn: Callable[[RunRecord], str]) -> Callable[[RunRecord], str]:
    return lambda r: fn(r) if r.status == FINISHED else MISSING


def _column(key: str, markdown: bool = True) -> _Column:
    text = _md if markdown else str
    fixed = {
        "run": _Column("run", lambda r: f"`{r.run_id}`" if markdown else r.run_id),
        "name": _Column("name", lambda r: text(r.name)),
        "dataset": _Column("dataset", lambda r: text(r.dataset or MISSING)),
        "model": _Column("model", lambda r: text(r.model or MISSING)),
        "attack": _Column("attack", lambda r: text(r.attack or MISSING)),
        "defense": _Column("defense", lambda r: text(r.defense or MISSING)),
        "status": _Column("status", lambda r: r.status),
        "seed": _Column("seed", lambda r: MISSING if r.seed is None else str(r.seed)),
        "wall_s": _Column("wall time", _finished_only(lambda r: fmt_seconds(r.wall_s))),
        # the attack phase's count (a failed run has no metrics: –)
        "n_poison": _Column("poisons", lambda r: fmt_metric("n_poison", (r.metrics.get("attack") or {}).get("n_poison"))),
    }
    if key in fixed:
        return fixed[key]
    # Any other key is a final metric.
    labels = METRIC_LABELS if markdown else {**METRIC_LABELS, **SHORT_LABELS}
    return _Column(labels.get(key, key), _finished_only(lambda r: fmt_metric(key, r.final_metrics.get(key))))


def runs_table(records: list[RunRecord], columns: list[str] | None = None) -> str:
    """A Markdown table comparing runs, one row each.

    ``columns`` are keys: ``run``, ``name``, ``dataset``, ``model``, ``attack``,
    ``defense``, ``status``, ``seed``, ``wall_s``, or any final-metric name (rates in
    ``RATE_METRICS`` are shown as percents with 2 decimals; see ``fmt_metric``). Missing
    values, and every number of a run that did not finish, show ``–``.
    """
    cols = [_column(k) for k in (columns or DEFAULT_COLUMNS)]
    lines = ["| " + " | ".join(c.header for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for rec in records:
        lines.append("| " + " | ".join(c.cell(rec) for c in cols) + " |")
    return "\n".join(lines) + "\n"


#: the terminal table's columns: the ones that matter within ``WIDTH`` characters
TERMINAL_COLUMNS = ["run", "attack", "defense", "clean_acc", "asr", "iso_precision", "iso_recall", "status"]
#: ``--wide``: every column
WIDE_COLUMNS = ["run", "dataset", "model", "attack", "defense", "seed", "n_poison", "clean_acc", "asr", "control_asr",
                "robust_acc", "iso_precision", "iso_recall", "wall_s", "status"]
SHORT_LABELS = {"iso_precision": "iso prec", "iso_recall": "iso rec", "control_asr": "ASR clean model"}
#: columns whose text may be cut (with …) to fit the width; the run id last (a prefix of it
#: still names the run for ``abl report`` and ``abl resume``)
_SHRINKABLE = ("attack", "defense", "dataset", "model", "run")
WIDTH = 100


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def terminal_table(records: list[RunRecord], wide: bool = False, width: int = WIDTH) -> str:
    """Runs as an aligned plain-text table for the terminal, one row each.

    By default the columns that matter (``TERMINAL_COLUMNS``) within ``width`` characters:
    long names are cut with …, and a run that failed gets its reason on the line below,
    cut to the width. ``wide``: every column (``WIDE_COLUMNS``) and whole reasons, whatever
    the width.
    """
    keys = WIDE_COLUMNS if wide else TERMINAL_COLUMNS
    cols = [_column(k, markdown=False) for k in keys]
    rows = [[c.cell(r) for c in cols] for r in records]
    widths = [max([len(c.header)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    gap = 2
    if not wide:
        for key in _SHRINKABLE:  # narrow the text columns, in this order, until the table fits
            i = keys.index(key) if key in keys else -1
            excess = sum(widths) + gap * (len(widths) - 1) - width
            if i >= 0 and excess > 0:
                widths[i] = max(len(cols[i].header), 8, widths[i] - excess)
    lines = []

    def line(cells: list[str]) -> str:
        return (" " * gap).join(_cut(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines.append(line([c.header for c in cols]))
    for rec, row in zip(records, rows):
        lines.append(line(row))
        if rec.status != FINISHED and rec.message:
            why = f"  {rec.status}: {' '.join(str(rec.message).split())}"
            lines.append(why if wide else _cut(why, width))
    return "\n".join(lines) + "\n"


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


#: the per-phase tables of a run's section: (title, does this metric belong here)
_PHASE_GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("Model", lambda n: n in ("clean_acc", "clean_acc_nontarget", "asr", "robust_acc")),
    ("Unlearning checks", lambda n: n.startswith(("iso_fit", "iso_heldout", "unlearn_"))),
    ("Isolation", lambda n: n.startswith("iso_")),
    ("Time and cache", lambda n: n.endswith("_s") or n.startswith("stage_")),
    ("Other", lambda n: True),
]


def _phase_metrics_table(rec: RunRecord) -> str:
    """The run's metrics per phase, as a few narrow tables (model, isolation, unlearning
    checks, time), each a metric per row and a column per phase that recorded any of them."""
    names: list[str] = []
    for values in rec.metrics.values():
        names += [n for n in values if n not in names]
    # a metric that is NaN wherever it appears (e.g. isolation precision without ground
    # truth) says nothing: leave its row out
    names = [n for n in names if not all(_is_nan(v.get(n)) for v in rec.metrics.values() if n in v)]
    groups: dict[str, list[str]] = {}
    for n in names:
        title = next(t for t, belongs in _PHASE_GROUPS if belongs(n))
        groups.setdefault(title, []).append(n)
    out = []
    for title, _ in _PHASE_GROUPS:
        rows = groups.get(title)
        if not rows:
            continue
        phases = [p for p, values in rec.metrics.items() if any(n in values for n in rows)]
        lines = [f"| {title} | " + " | ".join(_md(p) for p in phases) + " |",
                 "|---|" + "|".join("---:" for _ in phases) + "|"]
        for n in rows:
            lines.append(f"| {METRIC_LABELS.get(n, n)} | "
                         + " | ".join(fmt_metric(n, rec.metrics[p].get(n)) for p in phases) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- history


def _epochs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive records of the same (phase, epoch): one dict per global epoch."""
    out: list[dict[str, Any]] = []
    for rec in history:
        key = (rec.get("phase"), rec.get("epoch"))
        if out and (out[-1].get("phase"), out[-1].get("epoch")) == key:
            out[-1].update(rec)
        else:
            out.append(dict(rec))
    return out


def _phase_spans(epochs: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """``(phase, first, last)`` global epoch numbers (1-based) of each run of one phase."""
    spans: list[tuple[str, int, int]] = []
    for i, rec in enumerate(epochs, start=1):
        phase = str(rec.get("phase", ""))
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], i)
        else:
            spans.append((phase, i, i))
    return spans


def _mark_phases(ax, spans: list[tuple[str, int, int]]) -> None:
    if len(spans) < 2:
        return
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for k, (phase, first, last) in enumerate(spans):
        if k > 0:
            ax.axvline(first - 0.5, color="0.4", linestyle="--", linewidth=0.9)
        ax.text((first + last) / 2, 1.01, phase, transform=trans, ha="center", va="bottom",
                fontsize=8, color="0.25")


# ----------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    """A figure on the Agg canvas, outside pyplot: no global state, freed when dropped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png")
    fig.clear()


def _band(losses: np.ndarray):
    """Per-epoch nan-aware mean and 10/90 percentiles over the columns given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan epochs give nan, drawn as gaps
        mean = np.nanmean(losses, axis=1)
        lo, hi = np.nanpercentile(losses, [10, 90], axis=1)
    return mean, lo, hi


def plot_losses(rec: RunRecord, path: Path) -> str | None:
    """Figure 6 of the paper: loss of poisoned vs clean examples per epoch. None if
    written, else the reason it was skipped."""
    if not (rec.has_array("example_losses") and rec.has_array("poison_mask")):
        return "no per-example losses recorded"
    losses = rec.array("example_losses").astype(np.float64)
    mask = rec.array("poison_mask").astype(bool)
    if losses.ndim != 2 or mask.shape != (losses.shape[1],):
        return (f"per-example losses have shape {losses.shape} but the poison mask {mask.shape}: "
                "expected (epochs, N) and (N,)")
    if losses.shape[0] == 0:
        return "no epoch was trained in this run (its model came from the stage cache)"
    losses = np.clip(losses, 1e-6, None)  # log scale: zero losses sit at the floor
    x = np.arange(1, losses.shape[0] + 1)
    spans = _phase_spans(_epochs(rec.history()))
    truth = _has_ground_truth(rec)
    groups = loss_groups(rec, mask)

    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    for sel, label, color in groups:
        if not sel.any():
            continue
        mean, lo, hi = _band(losses[:, sel])
        ax.plot(x, mean, color=color, linewidth=1.8, marker="o" if len(x) <= 30 else None, markersize=3,
                label=f"{label} (n={int(sel.sum())}): mean")
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0, label=f"{label}: 10-90%")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss per example")
    ax.set_xlim(0.5, len(x) + 0.5)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if spans and spans[-1][2] == len(x):  # history aligns with the loss rows
        _mark_phases(ax, spans)
    fig.suptitle(f"{rec.name}: per-example loss" + ("" if truth else " (no ground truth: isolated vs the rest)"), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return None


def plot_curves(rec: RunRecord, path: Path) -> str | None:
    """Clean accuracy and ASR per global epoch, with phase boundaries."""
    epochs = _epochs(rec.history())
    keys = [k for k in ("clean_acc", "asr", "robust_acc") if any(k in e for e in epochs)]
    if "clean_acc" not in keys and "asr" not in keys:
        return "no clean accuracy / ASR history recorded"
    x = np.arange(1, len(epochs) + 1)
    fig = _new_figure(7.0, 3.6)
    ax = fig.add_subplot()
    styles = {"clean_acc": ("#2c7bb6", "-"), "asr": ("#d7191c", "-"), "robust_acc": ("#1a9641", "--")}
    for key in keys:
        y = np.array([float(e.get(key, math.nan)) for e in epochs]) * 100.0
        color, ls = styles[key]
        ax.plot(x, y, color=color, linestyle=ls, marker="o" if len(x) <= 30 else None, markersize=3, label=METRIC_LABELS[key])
    ax.set_ylim(-2, 102)
    ax.set_xlim(0.5, len(x) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _mark_phases(ax, _phase_spans(epochs))
    fig.suptitle(f"{rec.name}: clean accuracy and attack success rate", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return None


def _tile(image: np.ndarray, scale: int, rgb: tuple[int, int, int], border: int) -> np.ndarray:
    """(3, H, W) or (1, H, W) uint8 -> (H*scale + 2b, W*scale + 2b, 3), nearest upscaling,
    inside a border of colour ``rgb``."""
    img = image if image.shape[0] == 3 else np.repeat(image[:1], 3, axis=0)
    img = np.repeat(np.repeat(img.transpose(1, 2, 0), scale, axis=0), scale, axis=1)
    h, w = img.shape[:2]
    out = np.empty((h + 2 * border, w + 2 * border, 3), dtype=np.uint8)
    out[...] = rgb
    out[border:border + h, border:border + w] = img
    return out


def loss_groups(rec: RunRecord, mask: np.ndarray) -> list[tuple[np.ndarray, str, str]]:
    """(selection, label, colour) of the loss plot's curves: poisoned vs clean when the run
    applied a known attack; otherwise (``attack: null``) nothing is known to be clean, so
    the isolated (suspicious) examples vs the rest."""
    if _has_ground_truth(rec):
        return [(mask, "poisoned", "#d7191c"), (~mask, "clean", "#2c7bb6")]
    isolated = np.zeros(len(mask), dtype=bool)
    if rec.has_array("isolated_indices"):
        isolated[rec.array("isolated_indices").astype(np.int64)] = True
    return [(isolated, "isolated (suspicious)", "#fdae61"), (~isolated, "the rest", "#7f7f7f")]


def tile_titles(rec: RunRecord, k: int) -> list[str]:
    """Captions of the first ``k`` isolated pictures: the file name where the data came from
    files (shortened to fit), else the training index."""
    indices = rec.array("isolated_indices") if rec.has_array("isolated_indices") else np.arange(k)
    files = rec.array("isolated_files") if rec.has_array("isolated_files") else None
    out = []
    for i in range(k):
        title = Path(str(files[i])).name if files is not None and i < len(files) else f"#{int(indices[i])}"
        out.append(title if len(title) <= 18 else title[:8] + "…" + title[-8:])
    return out


def plot_mode_curve(rec: RunRecord, path: Path) -> str | None:
    """CA and ASR along the curve of a mode-connectivity repair (``notes.json`` ``curve``)."""
    curve = _notes(rec).get("curve")
    if not isinstance(curve, list) or not curve:
        return None
    ts = [p["t"] for p in curve]
    fig = _new_figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in (("clean_acc", "CA"), ("asr", "ASR")):
        ax.plot(ts, [100 * p.get(key, float("nan")) for p in curve], marker="o", label=label)
    chosen = (rec.config.get("defense") or {}).get("t")
    if isinstance(chosen, (int, float)):
        ax.axvline(chosen, color="grey", linestyle=":", label=f"kept t = {chosen}")
    ax.set_xlabel("t (0: backdoored, 1: fine-tuned on clean data)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return None


def plot_nc_triggers(rec: RunRecord, path: Path) -> bool:
    """Neural Cleanse's reversed trigger per class: the mask, and the mask times the
    pattern (what is stamped), titled with the mask's L1 norm and anomaly index."""
    if not (rec.path / "defense_artefacts.safetensors").is_file():
        return False
    arts = rec.tensors("defense_artefacts")
    if "nc_masks" not in arts or "nc_patterns" not in arts:
        return False
    masks, patterns = arts["nc_masks"].float().numpy(), arts["nc_patterns"].float().numpy()
    notes = _notes(rec)
    index, flagged = notes.get("anomaly_index") or [], set(notes.get("flagged") or [])
    k = len(masks)
    fig = _new_figure(max(4.0, 1.1 * k), 2.6)
    for c in range(k):
        for row, img in enumerate((masks[c, 0], (masks[c] * patterns[c]).transpose(1, 2, 0))):
            ax = fig.add_subplot(2, k, row * k + c + 1)
            ax.imshow(img, cmap="gray" if row == 0 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                a = f"\n{index[c]:.1f}" if c < len(index) else ""
                ax.set_title(f"{c}{' *' if c in flagged else ''}{a}", fontsize=7,
                             color="red" if c in flagged else "black")
    fig.suptitle("reversed triggers: mask (top), mask x pattern (bottom); class, anomaly index; * flagged", fontsize=8)
    fig.subplots_adjust(top=0.78, bottom=0.02, hspace=0.15)
    _save(fig, path)
    return True


def plot_attack_examples(rec: RunRecord, path: Path) -> bool:
    """Clean training images above the same images triggered, and the style domain when the
    attack has one (DFST): from the ``examples_*`` tensors the attack stored in ``trigger``."""
    if not (rec.path / "trigger.safetensors").is_file():
        return False
    arts = rec.tensors("trigger")
    if "examples_clean" not in arts or "examples_triggered" not in arts:
        return False
    rows = [("clean", arts["examples_clean"]), ("triggered", arts["examples_triggered"])]
    if "style_examples" in arts:
        rows.append(("style domain", arts["style_examples"]))
    k = max(len(r) for _, r in rows)
    fig = _new_figure(max(4.0, 1.0 * k), 1.1 * len(rows) + 0.4)
    for i, (name, images) in enumerate(rows):
        for j in range(len(images)):
            ax = fig.add_subplot(len(rows), k, i * k + j + 1)
            ax.imshow(images[j].numpy().transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{rec.attack}: clean vs triggered training images", fontsize=8)
    fig.subplots_adjust(top=0.85, bottom=0.02, hspace=0.1)
    _save(fig, path)
    return True


def _has_ground_truth(rec: RunRecord) -> bool:
    """Whether the run applied a known attack, so that poisoned / clean labels mean something."""
    return bool((rec.meta.get("components") or {}).get("attack")) or rec.has_array("isolated_is_poison")


def plot_isolated(rec: RunRecord, path: Path) -> str | None:
    """A grid of isolated examples, bordered green (poisoned) or red (clean)."""
    if not rec.has_array("isolated_images"):
        return "no isolated examples recorded"
    images = rec.array("isolated_images")
    # Without a known attack there is no ground truth: grey borders, no poison count.
    known = rec.has_array("isolated_is_poison")
    is_poison = rec.array("isolated_is_poison").astype(bool) if known else np.zeros(len(images), dtype=bool)
    # flags cover every isolated example, pictures only the first few (PREVIEW of them)
    is_poison = is_poison[: len(images)] if is_poison.ndim == 1 and len(is_poison) > len(images) else is_poison
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # tolerate channels-last
    if images.ndim != 4 or images.shape[1] not in (1, 3) or is_poison.shape != (images.shape[0],):
        return (f"isolated images have shape {images.shape} and flags {is_poison.shape}: "
                "expected (K, 3, H, W) and (K,)")
    if images.shape[0] == 0:
        return "no examples were isolated"
    if images.dtype != np.uint8:
        images = np.clip(images * (255.0 if images.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    indices = rec.array("isolated_indices") if rec.has_array("isolated_indices") else np.arange(len(images))
    total = max(len(indices), len(images))  # the run stores pictures of the first few only
    k = min(len(images), MAX_TILES)
    h, w = images.shape[2:]
    scale = max(1, math.ceil(64 / max(h, w)))
    border = max(2, (max(h, w) * scale) // 20)
    cols = min(8, k)
    rows = math.ceil(k / cols)
    fig = _new_figure(1.15 * cols + 0.2, 1.3 * rows + 0.6)
    titles = tile_titles(rec, k)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        rgb = (_POISON_RGB if is_poison[i] else _CLEAN_RGB) if known else _UNKNOWN_RGB
        ax.imshow(_tile(images[i], scale, rgb, border), interpolation="nearest")
        ax.set_title(titles[i], fontsize=6, pad=2)
        ax.set_axis_off()
    shown = f"{total} isolated, the first {k} shown" if k < total else f"{total} isolated, all shown"
    if known:
        fig.suptitle(f"{rec.name}: isolated examples ({shown}; {int(is_poison[:k].sum())} poisoned)\n"
                     "green border = poisoned, red = clean", fontsize=9)
    else:
        fig.suptitle(f"{rec.name}: isolated (suspicious) examples ({shown}), lowest loss first", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return None


def write_isolated_csv(rec: RunRecord, path: Path) -> bool:
    """``index,loss,is_poison,file`` per isolated example (``is_poison`` empty when the run had
    no known attack, ``file`` empty for datasets not read from files); False if none recorded."""
    names = ("isolated_indices", "isolated_is_poison", "isolated_losses", "isolated_files")
    arrays = {n: rec.array(n).reshape(-1) for n in names if rec.has_array(n)}
    if "isolated_indices" not in arrays and "isolated_is_poison" not in arrays:
        return False
    k = max(len(a) for a in arrays.values())

    def at(name: str, i: int):
        a = arrays.get(name)
        return a[i] if a is not None and i < len(a) else None

    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["index", "loss", "is_poison", "file"])
        for i in range(k):
            index, loss, poison = at("isolated_indices", i), at("isolated_losses", i), at("isolated_is_poison", i)
            file = at("isolated_files", i)
            out.writerow(["" if index is None else int(index),
                          "" if loss is None else f"{float(loss):.6g}",
                          "" if poison is None else str(bool(poison)).lower(),
                          "" if file is None else str(file)])
    return True


# ----------------------------------------------------------------------------- report


def _evidence_note(rec: RunRecord) -> list[str]:
    """A visible warning when a defense's isolation stood out weakly from the rest."""
    iso = rec.metrics.get("isolation", {})
    lines = []
    unl = rec.metrics.get("unlearning", {})
    if unl.get("unlearn_weak"):
        held = "iso_heldout_fit_after" in unl
        fit = unl["iso_heldout_fit_after"] if held else unl.get("iso_fit_after", float("nan"))
        which = "held-out suspects (isolated, kept out of unlearning)" if held else "isolated examples"
        lines += [
            f"> **Unlearning did not cut the link**: the final model still fits {fmt_rate(fit)} "
            f"of the {which} with their training labels. If they carry a backdoor, it is still there.",
            "",
        ]
    if 0 < unl.get("iso_heldout_count", 10) < 10:
        lines += [
            f"> The held-out check of unlearning rests on {plural(unl['iso_heldout_count'], 'suspect')} only: "
            "it can read 0.00% fitted while the backdoor still works. Isolate more for a firmer check.",
            "",
        ]
    if "unlearn_epoch_kept" in unl and unl["unlearn_epoch_kept"] < unl.get("unlearn_epochs_run", 0):
        lines += [
            f"> Unlearning ran {plural(unl['unlearn_epochs_run'], 'epoch')} and kept the model of epoch "
            f"{unl['unlearn_epoch_kept']:.0f}: of the epochs that kept the clean fit, the one that fitted the "
            f"suspects least (held-out suspects fitted: {fmt_rate(unl.get('iso_heldout_fit_after'))}).",
            "",
        ]
    if not iso.get("iso_weak"):
        return lines
    return lines + [
        f"> **Weak isolation evidence**: the isolated examples stand only {fmt_number(iso.get('iso_separation'))} "
        f"spreads apart from the rest, and {fmt_rate(iso.get('iso_top_label_share'))} of them share one label "
        "(one of these is below the defense's `min_separation` or `min_label_share`). They may be clean examples that the "
        "model fits easily, and unlearning them costs clean accuracy rather than removing a backdoor. "
        "Look at the loss curves and the isolated pictures below before trusting this model.",
        "",
    ]


def _run_section(rec: RunRecord, out_dir: Path) -> list[str]:
    lines = [f"## {rec.name} (`{rec.run_id}`)", ""]
    parts = [f"{c}: {getattr(rec, c)}" for c in ("dataset", "model", "attack", "defense") if getattr(rec, c)]
    meta = rec.meta
    git = meta.get("git")
    code = (git["revision"][:12] + (" (dirty)" if git.get("dirty") else "")) if git else "not a git checkout"
    lines += [f"- status: **{rec.status}**" + (f" ({rec.message})" if rec.status != FINISHED and rec.message else ""),
              f"- {', '.join(parts)}" if parts else "- components: not recorded",
              f"- seed: {rec.seed}; started {rec.started}; abl {meta.get('abl_version')}, code {code}; "
              f"torch {meta.get('torch_version')}; device {meta.get('device') or MISSING}; host {meta.get('hostname')}"]
    if rec.status == FINISHED:
        lines.append(f"- wall time: {fmt_seconds(rec.wall_s)}")
        lines += ["", _phase_metrics_table(rec) if rec.metrics else "No metrics recorded.\n"]
        lines += _evidence_note(rec)
    else:
        lines += ["", f"This run is **{rec.status}**: it has no final metrics. "
                      "Figures below, if any, show what it recorded before it stopped."
                      + (f" Continue it with `abl resume {rec.run_id}`." if rec.status == "interrupted" else ""), ""]

    stem = rec.run_id
    for title, suffix, plot in (("Per-example loss", "loss", plot_losses),
                                ("Clean accuracy and ASR", "curves", plot_curves),
                                ("Isolated examples", "isolated", plot_isolated)):
        png = out_dir / f"{stem}-{suffix}.png"
        skipped = plot(rec, png)
        lines.append(f"### {title}")
        lines.append("")
        lines.append(f"_{skipped}_" if skipped else f"![{title}]({png.name})")
        lines.append("")
    if rec.status == FINISHED and isinstance(_notes(rec).get("curve"), list):
        png = out_dir / f"{stem}-mode-curve.png"
        plot_mode_curve(rec, png)
        lines += ["### Mode-connectivity curve", "", f"![CA and ASR along the curve]({png.name})", ""]
    if plot_attack_examples(rec, out_dir / f"{stem}-attack-examples.png"):
        lines += ["### The trigger on training images", "",
                  f"![Clean vs triggered images]({stem}-attack-examples.png)", ""]
    if rec.status == FINISHED and plot_nc_triggers(rec, out_dir / f"{stem}-nc-triggers.png"):
        lines += ["### Neural Cleanse: reversed triggers", "",
                  f"![Reversed trigger per class]({stem}-nc-triggers.png)", ""]
    csv_path = out_dir / f"{stem}-isolated.csv"
    n_none = len(rec.array("isolated_indices")) if rec.has_array("isolated_indices") else None
    if n_none == 0:  # ``isolation_count: auto`` found no backdoor evidence
        lines += ["No example was isolated: nothing stood apart from the rest (no backdoor evidence), so "
                  "nothing was unlearned.", ""]
    elif write_isolated_csv(rec, csv_path):
        n_iso = len(rec.array("isolated_indices")) if rec.has_array("isolated_indices") else None
        n_img = len(rec.array("isolated_images")) if rec.has_array("isolated_images") else 0
        shown = min(n_img, MAX_TILES)
        count = (f"{plural(n_iso, 'example')} {'was' if n_iso == 1 else 'were'} isolated; the picture shows "
                 f"{('all of them' if n_iso > 1 else 'it') if shown >= n_iso else f'the first {shown}'}. "
                 if n_iso is not None else "")
        truth = "" if _has_ground_truth(rec) else "No attack was applied, so nothing here is known to be poisoned or clean. "
        lines += [f"{count}{truth}All isolated examples as a table (index, loss, file): "
                  f"[{csv_path.name}]({csv_path.name})", ""]
    return lines


# ----------------------------------------------------------------------------- comparisons


def _notes(rec: RunRecord) -> dict[str, Any]:
    try:
        notes = rec.json("notes")
    except StoreError:
        return {}
    return notes if isinstance(notes, dict) else {}


def _detector_label(spec: dict[str, Any]) -> str:
    """A detector's name, with the parameter that tells its variants apart."""
    name = str(spec.get("name"))
    if name == "label_smoothing":
        return f"label_smoothing {spec.get('smoothing_value')}"
    if name in ("lga", "lga_batch", "flooding", "abl_default") and spec.get("gamma") not in (None, 0.5):
        return f"{name} gamma={spec.get('gamma')}"
    return name


def detector_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per finished run that isolated with a known detector (the ``detect``
    defense, or ABL, whose ``notes.json`` names the detector it ran): attack, detector,
    precision / recall at the isolated fraction and the AUPRC of all scores."""
    rows = []
    for rec in records:
        if rec.status != FINISHED:
            continue
        defense = rec.config.get("defense") or {}
        spec = defense.get("detector") if defense.get("name") == "detect" else _notes(rec).get("detector")
        final = rec.final_metrics
        if not isinstance(spec, dict) or "iso_precision" not in final:
            continue
        rows.append({"run": rec.run_id, "attack": rec.attack or "none", "detector": _detector_label(spec),
                     "defense": defense.get("name"), "precision": final.get("iso_precision"),
                     "recall": final.get("iso_recall"), "auprc": final.get("iso_auprc"), "count": final.get("iso_count")})
    return rows


def plot_detector_bars(rows: list[dict[str, Any]], path: Path) -> None:
    """The ABL paper's Figure 7: precision of the isolated examples, per detector (bars)
    per attack (groups); several seeds of one cell are averaged, their range drawn."""
    attacks = sorted({r["attack"] for r in rows})
    detectors = sorted({r["detector"] for r in rows})
    fig = _new_figure(max(6.0, 1.2 * len(attacks) * max(1, len(detectors)) / 3 + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(detectors)
    for j, det in enumerate(detectors):
        xs, means, errs = [], [], [[], []]
        for i, att in enumerate(attacks):
            vals = [100 * r["precision"] for r in rows if r["attack"] == att and r["detector"] == det
                    and not _is_nan(r["precision"])]
            if not vals:
                continue
            m = float(np.mean(vals))
            xs.append(i - 0.4 + width * (j + 0.5))
            means.append(m)
            errs[0].append(m - min(vals))
            errs[1].append(max(vals) - m)
        ax.bar(xs, means, width, yerr=errs if any(errs[1]) else None, label=det, capsize=2)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("precision of isolated (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncols=min(4, len(detectors)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    _save(fig, path)


def unlearner_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per finished ABL run with an unlearning stage: the unlearner (from
    ``notes.json``), CA/ASR of the model it started from and after it, its time, and
    whether the isolation before it came from the stage cache (the paper's Table 8)."""
    rows = []
    for rec in records:
        if rec.status != FINISHED or "unlearning" not in rec.metrics:
            continue
        spec = _notes(rec).get("unlearner")
        if not isinstance(spec, dict):
            continue
        from abl.unlearning import UNLEARNERS

        cls = UNLEARNERS.get(str(spec.get("name"))) if spec.get("name") in UNLEARNERS else None
        start = rec.metrics.get("recovery") or rec.metrics.get("isolation") or {}
        after = rec.metrics["unlearning"]
        rows.append({"run": rec.run_id, "attack": rec.attack or "none", "unlearner": str(spec.get("name")),
                     "label": _unlearner_label(spec, cls),
                     "type": getattr(cls, "method_type", MISSING),
                     "discards": getattr(cls, "discards_isolated", None),
                     "start_asr": start.get("asr"), "start_ca": start.get("clean_acc"),
                     "asr": after.get("asr"), "clean_acc": after.get("clean_acc"), "stage_s": after.get("stage_s"),
                     "isolation_cached": rec.metrics.get("isolation", {}).get("stage_hit"),
                     "isolation_s": sum(rec.metrics.get(p, {}).get("stage_s", 0.0) for p in ("isolation", "recovery"))})
    return rows


def _unlearner_label(spec: dict[str, Any], cls: type | None) -> str:
    """The unlearner's name and the parameters where it differs from its defaults (the
    weights file aside), so two configurations of one method stay apart."""
    name = str(spec.get("name"))
    if cls is None:
        return name
    defaults = {k: v for k, v in vars(cls()).items() if not k.startswith("_")}
    diff = [f"{k}={v}" for k, v in spec.items() if k not in ("name", "weights") and k in defaults and defaults[k] != v]
    return f"{name} ({', '.join(diff)})" if diff else name


def comparison_sections(records: list[RunRecord], out_dir: Path) -> list[str]:
    """Figure 7 (detectors) and Table 8 (unlearners) from the runs that have them."""
    from abl.paper import TABLE8, TABLE8_BACKDOORED, TABLE8_SOURCE

    lines: list[str] = []
    det = detector_rows(records)
    if len({r["detector"] for r in det}) > 1:
        png = out_dir / "detectors.png"
        plot_detector_bars(det, png)
        lines += ["## Isolation by detector (the ABL paper's Figure 7)", "",
                  "Precision and recall of the isolated examples, and the area under the precision-recall "
                  "curve of every example's score (independent of the isolated fraction; a random ranking "
                  "scores the poison rate).", "",
                  "| attack | detector | defense | precision | recall | AUPRC | isolated | run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(det, key=lambda r: (r["attack"], r["detector"])):
            lines.append(f"| {_md(r['attack'])} | {_md(r['detector'])} | {_md(r['defense'])} | {fmt_rate(r['precision'])} "
                         f"| {fmt_rate(r['recall'])} | {fmt_rate(r['auprc'])} | {fmt_number(r['count'])} | `{r['run']}` |")
        lines += ["", f"![Isolation precision by detector]({png.name})", ""]
    unl = unlearner_rows(records)
    if len(unl) > 1:
        lines += ["## Unlearning methods (the ABL paper's Table 8)", "",
                  f"Ours beside the paper's ({TABLE8_SOURCE}; their backdoored model: ASR "
                  f"{TABLE8_BACKDOORED['asr']:.2f}%, CA {TABLE8_BACKDOORED['clean_acc']:.2f}%). "
                  "Start: the model the isolation (and recovery) left, which every unlearner starts from.", "",
                  "| unlearner | type | discards D_b | start ASR | start CA | ASR | CA | paper ASR | paper CA "
                  "| unlearning time | isolation | run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = list(TABLE8) + ["ascent"]
        for r in sorted(unl, key=lambda r: (r["attack"], order.index(r["unlearner"]) if r["unlearner"] in order else 99)):
            paper = TABLE8.get(r["unlearner"], {})
            discard = {True: "yes", False: "no"}.get(r["discards"], MISSING)  # type: ignore[arg-type]
            cached = r["isolation_cached"]
            iso = "cached" if cached == 1.0 else f"trained ({fmt_seconds(r['isolation_s'])})"
            pa = f"{paper['asr']:.2f}%" if "asr" in paper else MISSING
            pc = f"{paper['clean_acc']:.2f}%" if "clean_acc" in paper else MISSING
            lines.append(f"| {_md(r['label'])} | {r['type']} | {discard} | {fmt_rate(r['start_asr'])} | "
                         f"{fmt_rate(r['start_ca'])} | {fmt_rate(r['asr'])} | {fmt_rate(r['clean_acc'])} | {pa} | {pc} | "
                         f"{fmt_seconds(r['stage_s'])} | {iso} | `{r['run']}` |")
        lines.append("")
    return lines


def write_report(store: RunStore, run_ids: list[str], out_dir: Path, title: str = "abl report") -> Path:
    """Write ``out_dir/report.md`` (table + a section per run) and its PNGs; return its path.

    ``run_ids`` may be unique prefixes; every number comes from the store.
    """
    if not run_ids:
        raise StoreError("no runs to report: give run ids (`abl report` lists them)")
    records: list[RunRecord] = []
    for run_id in run_ids:
        rec = store.get(run_id)
        if rec.run_id not in {r.run_id for r in records}:
            records.append(rec)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AblError(f"report folder '{out_dir}' is a file, not a folder: pass --out a folder (made if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AblError(f"report folder '{out_dir}' cannot be made ({exc.strerror or exc}): pass --out a folder "
                       "you can write") from None

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# {title}", "",
             f"Built from the results store `{store.root}` on {now}: {plural(len(records), 'run')}. "
             "Rates are percents; runs that did not finish show no numbers.", "",
             runs_table(records)]
    lines += comparison_sections(records, out_dir)
    for rec in records:
        lines += _run_section(rec, out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path

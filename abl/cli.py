"""The ``abl`` command: a thin layer that parses, calls the library and prints."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from abl.errors import AblError


@contextlib.contextmanager
def _resume_hint(runs_dir: Path):
    """On Ctrl-C or SIGTERM, say how to continue the run this process was training."""
    try:
        yield
    except KeyboardInterrupt:
        from abl.store import INTERRUPTED, RunStore

        try:
            mine = [r for r in RunStore(runs_dir).list_runs(status=INTERRUPTED) if r.meta.get("pid") == os.getpid()]
        except AblError:
            mine = []
        for rec in mine:
            print(f"abl: run {rec.run_id} stopped; {_how_to_continue(rec, runs_dir)}", file=sys.stderr)
        raise


def _how_to_continue(rec, runs_dir: Path) -> str:
    """``abl resume`` for a run that keeps checkpoints; else that it must start again."""
    from abl.experiment import keeps_checkpoints

    if keeps_checkpoints(rec):
        return f"continue it with: abl resume {rec.run_id} --runs-dir {runs_dir}"
    return "it kept no checkpoint (train.checkpoint: false), so it cannot resume: start a new run with `abl run`"


def _cmd_run(args: argparse.Namespace) -> int:
    from abl.experiment import load_experiment, run_experiment
    from abl.report import terminal_table

    exp = load_experiment(args.config, args.set)
    if args.runs_dir:
        exp.output.runs_dir = args.runs_dir
    with _resume_hint(Path(exp.output.runs_dir)):
        record = run_experiment(exp)
    print(terminal_table([record]), end="")
    print(f"run {record.run_id} finished: {record.path}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from abl.experiment import resume_experiment
    from abl.report import terminal_table
    from abl.store import RunStore

    root = Path(args.runs_dir)
    if not root.is_dir():
        raise AblError(f"runs folder '{root}' does not exist; pass the --runs-dir the run was started with")
    with _resume_hint(root):
        record = resume_experiment(args.run, RunStore(root))
    print(terminal_table([record]), end="")
    print(f"run {record.run_id} finished: {record.path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from abl.demo import demo_table, run_demo

    records, report = run_demo(args.out, args.set)
    print(demo_table(records), end="")
    print(f"report: {report} (open it in a Markdown viewer; the PNGs sit beside it)")
    print(f"the runs: abl report --runs-dir {Path(args.out) / 'runs'}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from abl.registries import all_registries
    from abl.registry import format_component, format_names

    registries = all_registries()
    if args.kind is None:
        for kind, registry in registries.items():
            print(format_names(kind, registry.names()))
        return 0
    kind = args.kind.rstrip("s") if args.kind.rstrip("s") in registries else args.kind
    if kind not in registries:
        raise AblError(f"unknown kind '{args.kind}'; use one of {', '.join(registries)} (e.g. `abl list attack badnets`)")
    registry = registries[kind]
    if args.name is None:
        print(format_names(kind, registry.names()))
        return 0
    print(format_component(kind, args.name, registry.get(args.name)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from abl.report import terminal_table, write_report
    from abl.store import RunStore

    root = Path(args.runs_dir)
    if not root.is_dir():
        raise AblError(f"runs folder '{root}' does not exist; run an experiment first or pass --runs-dir")
    store = RunStore(root)
    records = [store.get(r) for r in args.runs] if args.runs else store.list_runs(status=args.status)
    if not records:
        print(f"no runs in '{root}'")
        return 0
    print(terminal_table(records, wide=args.wide), end="")
    for rec in records:
        if rec.status == "interrupted":
            print(f"run {rec.run_id} was interrupted; {_how_to_continue(rec, root)}")
    if args.out:
        path = write_report(store, [r.run_id for r in records], Path(args.out))
        print(f"report: {path}")
    return 0


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: a local Ray "
                   "started for this command")
    p.add_argument("--cpus-per-run", type=_positive(float), default=1.0, help="CPUs per cell (also its torch threads; "
                   "default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="GPU share per cell: 0.25 puts four small runs on "
                   "one GPU (default 0)")
    p.add_argument("--num-cpus", type=_positive(int), help="CPUs of the local Ray (default: all)")
    p.add_argument("--max-concurrent", type=_positive(int), help="at most this many cells at once (default: as many "
                   "as the resources allow)")
    p.add_argument("--seeds", type=_positive(int), help="run every cell with seeds 0..N-1 (tables show mean ± sd)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value in every cell, "
                   "repeatable")


def _sweep_options(args: argparse.Namespace) -> dict:
    if args.gpus_per_run < 0:
        raise AblError(f"--gpus-per-run must be >= 0, got {args.gpus_per_run}")
    return {"address": args.address, "cpus_per_run": args.cpus_per_run, "gpus_per_run": args.gpus_per_run,
            "num_cpus": args.num_cpus, "max_concurrent": args.max_concurrent}


def _cmd_sweep(args: argparse.Namespace) -> int:
    from abl.sweep import load_grid, run_sweep, sweep_table

    grid = load_grid(args.grid, seeds=args.seeds, overrides=args.set)
    runs_dir = Path(args.runs_dir or grid.runs_dir or grid.base.get("output", {}).get("runs_dir") or "runs")
    result = run_sweep(grid, runs_dir, progress=lambda line: print(line, flush=True), **_sweep_options(args))
    table = sweep_table(result.cells, result.records)  # every axis, the variants' names included
    out = runs_dir / f"sweep-{grid.name}.md"
    out.write_text(f"# grid {grid.name}\n\n{len(result.records)} of {len(result.cells)} cells finished "
                   f"({result.skipped} from earlier runs); store: {runs_dir}\n\n{table}", encoding="utf-8")
    print(table)
    print(f"table: {out}")
    if result.failed:
        for cid, message in result.failed.items():
            print(f"abl: cell {cid} failed: {message}", file=sys.stderr)
        print(f"abl: {len(result.failed)} cell(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from abl.reproduce import TABLES, TABLES_MISSING, Context, parse_roots, reproduce

    if args.table == "list":
        for name, spec in TABLES.items():
            tag = " [ours only: no paper numbers]" if spec.render else " [figure: our numbers and the plot]" if spec.figure else ""
            print(f"{name}: {spec.title} ({spec.source}){tag}")
        for name, why in TABLES_MISSING.items():
            print(f"{name}: not in abl reproduce yet; {why}")
        return 0
    ctx = Context(args.scale, parse_roots(args.root), args.trojan_trigger and str(Path(args.trojan_trigger).absolute()))
    if ctx.trojan_trigger and not Path(ctx.trojan_trigger).is_file():
        raise AblError(f"--trojan-trigger '{args.trojan_trigger}' is not a file")
    if args.dry_run:
        from abl.reproduce import describe

        print("\n".join(describe(args.table, args.scale, ctx, args.rows, args.cols, args.seeds, args.set)))
        return 0
    import shlex

    command = "abl " + shlex.join(args.argv)
    rep = reproduce(args.table, args.scale, ctx, args.runs_dir, args.out, rows=args.rows, cols=args.cols, seeds=args.seeds,
                    overrides=args.set, table_only=args.table_only, command=command,
                    progress=lambda line: print(line, flush=True),
                    **_sweep_options(args))
    print(rep.markdown)
    print(f"table: {rep.table_path}" + (f"; figure: {rep.figure_path}" if rep.figure_path else ""))
    if rep.result.failed:
        print(f"abl: {len(rep.result.failed)} cell(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from abl.inference import load_model, predict_csv, write_atomic

    model = load_model(args.run, args.runs_dir)
    text = predict_csv(model, args.paths)
    if args.out:
        write_atomic(args.out, text)
        print(f"predictions: {args.out} ({text.count(chr(10)) - 1} images)")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from abl.inference import evaluate_folder, evaluation_lines, load_model

    result = evaluate_folder(load_model(args.run, args.runs_dir), args.data, target=args.target)
    print("\n".join(evaluation_lines(result)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from abl.inference import export_model, load_model

    path = export_model(load_model(args.run, args.runs_dir), args.out, args.format)
    print(f"exported: {path} ({args.format})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from abl import __version__

    parser = argparse.ArgumentParser(prog="abl", description="Anti-Backdoor Learning: train clean models on poisoned data.")
    parser.add_argument("--version", action="version", version=f"abl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an experiment from a YAML config")
    p.add_argument("config", help="YAML file naming dataset, model, attack, defense and their parameters")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (dotted key), repeatable")
    p.add_argument("--runs-dir", help="results folder (default: the config's output.runs_dir)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run", help="the run id (or a unique prefix) shown by `abl report`")
    p.add_argument("--runs-dir", default="runs", help="results folder (default: runs)")
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("demo", help="BadNets on the bundled digits, without defense and with ABL (no downloads)")
    p.add_argument("--out", default="abl-demo", help="folder for the runs and the report (default: abl-demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, repeatable")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("list", help="list the registered datasets, models, attacks, defenses, detectors and unlearners, "
                       "or one's parameters")
    p.add_argument("kind", nargs="?", help="dataset, model, attack, defense, detector or unlearner: list only these")
    p.add_argument("name", nargs="?", help="a component: show its parameters with defaults (e.g. `abl list attack badnets`)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("report", help="list and compare runs; with --out, write a Markdown report with plots")
    p.add_argument("runs", nargs="*", help="run ids (or unique prefixes); default: every run")
    p.add_argument("--runs-dir", default="runs", help="results folder (default: runs)")
    p.add_argument("--status", choices=["finished", "failed", "running", "interrupted"], help="only runs with this status")
    p.add_argument("--out", help="write report.md and PNG plots into this folder")
    p.add_argument("--wide", action="store_true", help="every column and whole failure reasons, however wide "
                   "(default: the main columns within 100 characters)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("sweep", help="run a grid of experiments (axes x seeds) on Ray; rerun to finish an interrupted grid")
    p.add_argument("grid", help="grid YAML: a base config plus axes (see abl/sweep.py)")
    p.add_argument("--runs-dir", help="results folder (default: the grid's runs_dir, else the base config's)")
    _sweep_args(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("reproduce", help="run one of the paper's appendix tables or figures and write it beside the paper's numbers")
    p.add_argument("table", help="table6, table7, table8, table10, table11, figure6, figure7, figure8, figure9 or "
                   "matrix (every attack x rate x defense, issue 24); `list` shows them and what is missing")
    p.add_argument("--scale", choices=["slice", "full"], default="slice", help="slice: 5,000 CIFAR-10 images and "
                   "shortened schedules, minutes per cell on a CPU; full: the paper's setting (default: slice)")
    p.add_argument("--root", action="append", default=[], metavar="DATASET=PATH", help="where a dataset is (cifar10, "
                   "gtsrb); default data/<name>, downloaded by torchvision when missing")
    p.add_argument("--trojan-trigger", help="the Trojan trigger file (the authors' .npz) for tables 6, 10, 11")
    p.add_argument("--rows", nargs="+", help="run only these rows of the table (e.g. CIFAR-10)")
    p.add_argument("--cols", nargs="+", help="run only these columns of the table (e.g. BadNets)")
    p.add_argument("--runs-dir", default="runs", help="results folder (default: runs)")
    p.add_argument("--out", default="reproduce", help="folder for the Markdown table and the figure (default: reproduce)")
    p.add_argument("--dry-run", action="store_true", help="print each cell (or why it is not run) and run nothing")
    p.add_argument("--table-only", action="store_true",
                   help="write the table from the cells already finished in --runs-dir and run nothing "
                        "(a grid run in parts; the other cells read 'not run yet')")
    _sweep_args(p)
    p.set_defaults(func=_cmd_reproduce)

    run_help = "a run folder, or a run id (or unique prefix) in --runs-dir"
    p = sub.add_parser("predict", help="classify image files with a finished run's model; CSV of file, class, probability")
    p.add_argument("run", help=run_help)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--runs-dir", help="results folder holding the run id (default: runs)")
    p.add_argument("--out", help="write the CSV to this file (default: print it)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="a run's accuracy on a <class>/<image> folder; with --target, the share sent "
                       "to that class")
    p.add_argument("run", help=run_help)
    p.add_argument("--data", required=True, help="a folder of <class>/<image> folders named as the run's classes; "
                   "with --target also a folder of unlabelled images")
    p.add_argument("--target", metavar="CLASS", help="count the images classified as CLASS (e.g. images carrying "
                   "a trigger you found); images in CLASS's own folder are left out of the count")
    p.add_argument("--runs-dir", help="results folder holding the run id (default: runs)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write a finished run's model as TorchScript (or ONNX) for use without abl")
    p.add_argument("run", help=run_help)
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="torchscript (default; "
                   "takes uint8 or [0, 1] images of any size) or onnx (pip install 'abl[onnx]'; uint8 NCHW at the "
                   "run's size)")
    p.add_argument("--out", required=True, help="the file to write (e.g. model.pt or model.onnx)")
    p.add_argument("--runs-dir", help="results folder holding the run id (default: runs)")
    p.set_defaults(func=_cmd_export)
    return parser


class _OneLine(logging.Formatter):
    """``abl: warning: <message>`` (``abl: <message>`` for progress notes), on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        return f"abl: warning: {message}" if record.levelno >= logging.WARNING else f"abl: {message}"


@contextlib.contextmanager
def _log_to_stderr():
    """While a command runs: the library's log (logger ``abl``, INFO and up) and every
    ``warnings.warn`` go to stderr as one line each, without a source path or code line.
    The library keeps raising plain warnings (what tests and Python callers catch); only
    the command line shows them this way, as ``logging.captureWarnings`` would."""
    logger = logging.getLogger("abl")
    handler = logging.StreamHandler(sys.stderr)  # the stderr of now (pytest swaps it per test)
    handler.setFormatter(_OneLine())
    saved = logger.level, logger.propagate, warnings.showwarning
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        logger.warning("%s", message)

    warnings.showwarning = show
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        warnings.showwarning = saved[2]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, recorded with tables
    # SIGTERM (a scheduler's kill, `kill PID`) ends a run like Ctrl-C: recorded as
    # interrupted, not left "running" forever.
    previous = previous_int = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        # `abl run &` in a script starts with SIGINT ignored (a shell's background job);
        # Ctrl-C must still stop it as interrupted and resumable, as SIGTERM does
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _log_to_stderr():
            code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return code
    except AblError as exc:
        print(f"abl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `abl list | head`: the reader left; say nothing more (and not at exit either)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


if __name__ == "__main__":
    sys.exit(main())

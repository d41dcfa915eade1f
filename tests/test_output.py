"""What `abl` prints is readable: `abl list`, `abl report` and warnings fit a terminal,
with whole texts, one number format and no Python internals (issue 27, part B)."""

from __future__ import annotations

import re

import numpy as np

import pytest

from abl.cli import main
from abl.registries import all_registries

WIDTH = 100
_CODE_NAME = re.compile(r"(?<![A-Za-z0-9])_[A-Z][A-Z0-9_]+")  # _DEFAULT_DIFFERS
_ROLE = re.compile(r":(func|class|meth|data|attr|mod):")
_RAW_WARNING = re.compile(r"(Warning:|\.py:\d+|Traceback)")

COMPONENTS = [(kind, name) for kind, registry in all_registries().items() for name in registry.names()]


def assert_readable(text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= WIDTH, f"{len(line)} characters: {line!r}"
        assert not _CODE_NAME.search(line), f"code name in {line!r}"
        assert not _ROLE.search(line), f"Sphinx role in {line!r}"
        assert "..." not in line and "…" not in line, f"cut text in {line!r}"


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=[f"{k}-{n}" for k, n in COMPONENTS])
def test_list_renders_every_component_readably(kind, name, capsys):
    assert main(["list", kind, name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{kind} {name}")
    assert_readable(out)


@pytest.mark.parametrize("kind", ["attack", "defense", "detector", "unlearner"])
def test_every_parameter_of_these_kinds_is_described(kind):
    """Descriptions come from the docstrings' ``Parameters:`` sections, including entries
    whose names run over two lines and ``prefix_*`` entries (datasets and models are not
    documented that way yet)."""
    from abl.registry import describe

    registry = all_registries()[kind]
    undescribed = [f"{name}.{p.name}" for name in registry.names() for p in describe(registry.get(name)) if not p.doc]
    assert undescribed == []


def _entries(out: str) -> dict[str, str]:
    """``abl list KIND NAME`` output -> parameter name -> its heading and description."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   "):
            current = line.split(":")[0].strip()
            entries[current] = [line.strip()]
        elif current is not None:
            entries[current].append(line.strip())
    return {k: " ".join(v) for k, v in entries.items()}


def test_list_abl_shows_preset_values_and_whole_descriptions(capsys):
    from abl.defenses.abl import PRESETS

    assert main(["list", "defense", "abl"]) == 0
    entries = _entries(capsys.readouterr().out)
    # a field the preset fills in shows each preset's value, not null
    assert "= default: 20, paper: 20, official: 10" in entries["isolation_epochs"]
    assert "official: 64" in entries["batch_size"] and "default: null" in entries["batch_size"]
    for name in PRESETS["default"]:
        assert "= null" not in entries[name], entries[name]
    # whole descriptions: the end of a long one is there, unbroken
    assert entries["ranking"].endswith("which a single epoch's loss does not.")
    # each recovery_* key describes itself
    recovery = [entries[k].split(" = ", 1)[1] for k in entries if k.startswith("recovery_")]
    assert len(recovery) == 8 and len(set(recovery)) == 8


def test_list_of_every_kind_fits_100_columns(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert_readable(out)
    for kind, registry in all_registries().items():
        assert f"{kind}s: " in out
        for name in registry.names():
            assert re.search(rf"[ ,]{name}(,|$)", out, re.M), name


def test_list_help_names_every_kind(capsys):
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for kind in all_registries():
        assert kind in help_text


# ----------------------------------------------------------------------------- numbers


def test_one_number_format():
    from abl.report import fmt_metric, plural

    assert fmt_metric("clean_acc", 0.9312) == "93.12%"
    assert fmt_metric("rank_s", 0.0004833) == "0.0 s"  # seconds: one decimal, never 0.0004833
    assert fmt_metric("stage_s", 28.725) == "28.7 s"
    assert fmt_metric("iso_separation", 7.0523247) == "7.05"
    assert fmt_metric("iso_count", 13.0) == "13" and fmt_metric("unlearn_epochs_run", 18.0) == "18"
    assert fmt_metric("iso_weak", 0.0) == "no" and fmt_metric("stage_hit", 1.0) == "yes"
    assert fmt_metric("anomaly", 0.002024) == "0.00"
    assert plural(1, "suspect") == "1 suspect" and plural(3, "suspect") == "3 suspects"


def test_report_notes_say_1_suspect(tmp_path):
    from abl.report import write_report
    from abl.store import RunStore

    store = RunStore(tmp_path / "runs")
    with store.create_run({"dataset": {"name": "digits"}}, name="one", seed=0) as run:
        run.save_array("isolated_indices", np.array([5]))
        run.finish({"unlearning": {"iso_heldout_count": 1.0, "unlearn_epochs_run": 1.0, "unlearn_epoch_kept": 0.0,
                                   "iso_heldout_fit_after": 0.0, "rank_s": 0.0004833},
                    "final": {"clean_acc": 0.5}}, wall_s=1.0)
    text = write_report(store, [run.run_id], tmp_path / "r").read_text()
    assert "rests on 1 suspect only" in text and "ran 1 epoch and" in text
    assert "1 example was isolated" in text and "1 run." in text
    assert not re.search(r"\b0\.000\d", text)  # no 0.0004833 anywhere


# ----------------------------------------------------------------------------- abl report


def _runs(tmp_path):
    from abl.store import RunStore

    store = RunStore(tmp_path / "runs")
    config = {"dataset": {"name": "cifar10"}, "model": {"name": "preact_resnet18"},
              "attack": {"name": "sleeper_agent"}, "defense": {"name": "neural_cleanse"}}
    with store.create_run(config, name="a very long experiment name that makes a long run id", seed=0) as run:
        run.finish({"final": {"clean_acc": 0.9312, "asr": 0.0123, "robust_acc": 0.8, "iso_precision": 1.0,
                              "iso_recall": 0.6}}, wall_s=61.27)
    reason = "ValueError: " + "the data went wrong in a way that takes many words to explain " * 4 + "END"
    with pytest.raises(ValueError):
        with store.create_run(config, name="crashed", seed=1) as failed:
            raise ValueError(reason.removeprefix("ValueError: "))
    return store, run.run_id, failed.run_id, reason


def test_abl_report_fits_100_columns_and_shows_why_a_run_failed(tmp_path, capsys):
    store, ok, failed, reason = _runs(tmp_path)
    assert main(["report", "--runs-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert lines[0].split() == ["run", "attack", "defense", "CA", "ASR", "iso", "prec", "iso", "rec", "status"]
    row = next(line for line in lines if "finished" in line)
    assert "93.12%" in row and "1.23%" in row and "100.00%" in row and "60.00%" in row
    why = lines[lines.index(next(line for line in lines if line.startswith(failed))) + 1]
    assert why.startswith("  failed: ValueError: the data went wrong") and why.endswith("…")
    # --wide: every column, the whole reason
    assert main(["report", "--runs-dir", str(store.root), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert f"  failed: {reason}" in wide.splitlines()
    assert ok in wide and "preact_resnet18" in wide and "61.3 s" in wide and "RA" in wide.splitlines()[0]


# ----------------------------------------------------------------------------- warnings, progress


def test_abl_run_prints_warnings_as_one_line_and_progress_across_phases(tmp_path, capsys):
    """A tiny ABL run on digits: its warning (the held-out check rests on 3 suspects) comes
    as ``abl: warning: ...`` without a source line, the phases count "i of 3", and neither
    `abl run` nor `abl report` prints a traceback or a line over 100 characters."""
    import yaml

    cfg = {"name": "tiny", "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 8},
           "attack": {"name": "badnets", "rate": 0.1},
           "defense": {"name": "abl", "isolation_count": "fixed", "isolation_epochs": 2, "recovery_epochs": 1,
                       "recovery_milestones": [], "unlearning_epochs": 1},
           "train": {"batch_size": 128, "threads": 1, "progress": True, "eval_subset": 200},
           "output": {"runs_dir": str(tmp_path / "runs")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    out, err = capsys.readouterr()
    err_lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("abl:")]
    warnings_ = [line for line in err_lines if line.startswith("abl: warning: ")]
    assert any("rests on 3 suspects only" in line for line in warnings_), err
    assert [line.split(",")[0] for line in err_lines if "phase" in line] == [
        "abl: phase 1 of 3: isolation", "abl: phase 2 of 3: recovery", "abl: phase 3 of 3: unlearning"]
    assert "run 2/4 epochs" in next(line for line in err_lines if "phase 2 of 3" in line)
    assert main(["report", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    out2, err2 = capsys.readouterr()
    for text in (out, err, out2, err2):
        assert not _RAW_WARNING.search(text), text
    # (a line naming a path in pytest's deep tmp folder is as long as the path)
    assert all(len(line) <= WIDTH for line in (out + out2).splitlines() if str(tmp_path) not in line)


def test_a_slow_first_decode_says_so(tmp_path, monkeypatch, caplog):
    """The first decode of a dataset (CIFAR-10: ~15 s) logs a line while it runs, and how long
    it took; a quick one says nothing."""
    import logging
    import threading

    import abl.data.cache as cache

    monkeypatch.setattr(cache, "DECODE_NOTE_AFTER_S", 0.0)
    noted = threading.Event()

    class Waiter(logging.Handler):
        def emit(self, record):
            noted.set()

    waiter = Waiter()
    logging.getLogger("abl.data.cache").addHandler(waiter)
    try:
        with caplog.at_level(logging.INFO, logger="abl"):
            # the build outlasts the (zero) delay: it returns only once the note is out
            result = cache._decode_noting_delay("cifar10", tmp_path / "x.npz", lambda: noted.wait(30) and "splits")
    finally:
        logging.getLogger("abl.data.cache").removeHandler(waiter)
    assert result == "splits"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("decoding cifar10 for the first time") and str(tmp_path) in messages[0]
    assert messages[1].startswith("decoded cifar10 in ")
    caplog.clear()
    monkeypatch.setattr(cache, "DECODE_NOTE_AFTER_S", 60.0)
    with caplog.at_level(logging.INFO, logger="abl"):
        cache._decode_noting_delay("digits", tmp_path / "y.npz", lambda: "quick")
    assert caplog.records == []


def test_the_demo_turns_its_inevitable_warning_into_a_note(caplog):
    """The demo's 13 isolated digits hold out 3: the held-out warning is true but nothing a demo
    user can act on, so it becomes a note with the numbers; any other warning passes on."""
    import logging
    import warnings
    from types import SimpleNamespace

    from abl.demo import _pass_on

    def caught(text):
        return warnings.WarningMessage(UserWarning(text), UserWarning, "x.py", 1)

    record = SimpleNamespace(metrics={"unlearning": {"iso_heldout_count": 3.0}})
    with caplog.at_level(logging.INFO, logger="abl"), warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        _pass_on([caught("ABL: the held-out check of unlearning rests on 3 suspects only; ..."),
                  caught("something else")], record)
    assert [str(w.message) for w in passed] == ["something else"]
    (note,) = [r.getMessage() for r in caplog.records]
    assert note.startswith("note: ") and "rests on 3 of its isolated examples" in note


def test_report_md_splits_the_per_phase_metrics_into_narrow_tables(tmp_path):
    """24 metrics over 5 phases: a table per kind (model, isolation, unlearning checks,
    time), a row per metric and a column per phase, none wider than the phases it has."""
    from abl.report import write_report
    from abl.store import RunStore

    store = RunStore(tmp_path / "runs")
    model = {"clean_acc": 0.9, "clean_acc_nontarget": 0.89, "asr": 0.5, "robust_acc": 0.4}
    iso = {"iso_precision": 1.0, "iso_recall": 0.1, "iso_count": 13.0, "iso_auprc": 0.9, "iso_separation": 7.05,
           "iso_top_label_share": 1.0, "iso_weak": 0.0}
    unl = {"iso_fit_before": 1.0, "iso_fit_after": 0.0, "unlearn_weak": 0.0, "unlearn_epochs_run": 18.0,
           "iso_heldout_fit_before": 1.0, "iso_heldout_fit_after": 0.0, "iso_heldout_count": 30.0,
           "unlearn_epoch_kept": 18.0}
    with store.create_run({"dataset": {"name": "digits"}}, name="wide", seed=0) as run:
        run.finish({"attack": {"poison_s": 0.0068}, "isolation": {**model, **iso, "stage_s": 28.7, "rank_s": 0.0004},
                    "recovery": {**model, "stage_s": 15.3}, "unlearning": {**model, **unl, "stage_s": 18.3},
                    "final": {**model, **iso}}, wall_s=62.6)
    text = write_report(store, [run.run_id], tmp_path / "r").read_text()
    section = text.split("## wide")[1]
    tables = [line for line in section.splitlines() if line.startswith("|")]
    headers = [line for line in tables if not line.startswith("|---") and line.split("|")[1].strip() in
               ("Model", "Isolation", "Unlearning checks", "Time and cache")]
    assert [h.split("|")[1].strip() for h in headers] == ["Model", "Unlearning checks", "Isolation", "Time and cache"]
    assert "| Isolation | isolation | final |" in headers
    assert all(line.count("|") <= 6 for line in tables), "one column per phase (5) and the metric's name"
    assert "| Stage time | – | 28.7 s | 15.3 s | 18.3 s |" in tables and "| Ranking time | – | 0.0 s | – | – |" in tables

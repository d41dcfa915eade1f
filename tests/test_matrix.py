"""The threat matrix (issue 24, item 4): ``abl reproduce matrix --scale slice|full``, every
attack x poisoning rate x defense (none, the ``clean`` oracle, the default ABL), and the
``clean`` defense itself. The plumbing is tested on digits; the real matrix is not run here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import slice_schedule
from abl import reproduce
from abl.attacks import ATTACKS
from abl.experiment import build_experiment, run_experiment
from abl.reproduce import MATRIX_ATTACKS, MATRIX_DEFENSES, MATRIX_RATES, Context, plan, render_matrix
from abl.store import RunStore
from abl.sweep import SweepResult

TROJAN = "/nonexistent/trojan.npz"  # planning only: the trigger file is read when a run builds it


def test_the_clean_defense_trains_without_the_poisons_and_keeps_wanets_cross_examples(tmp_path):
    raw = {"name": "oracle", "dataset": {"name": "digits"}, "model": {"name": "small_cnn", "width": 4},
           "attack": {"name": "wanet", "rate": 0.05, "target": 0},
           "defense": {"name": "clean", "epochs": 1, "milestones": []},
           "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1}}
    rec = run_experiment(build_experiment(raw), RunStore(tmp_path / "runs"))
    mask = rec.array("poison_mask").astype(bool)
    losses = rec.array("example_losses")  # NaN: an example the epoch did not train on
    assert rec.metrics["clean"]["removed"] == mask.sum() == rec.metrics["attack"]["n_poison"] > 0
    assert np.isnan(losses[:, mask]).all() and np.isfinite(losses[:, ~mask]).all()
    attack = ATTACKS.create(raw["attack"])
    cross = attack.select_cross(torch.from_numpy(mask)).numpy()  # indices of the noise-mode examples
    assert len(cross) == 2 * mask.sum() and not mask[cross].any()
    assert np.isfinite(losses[:, cross]).all()  # they are not poisons: trained on


@pytest.mark.parametrize("scale", ["slice", "full"])
def test_the_matrix_plans_every_attack_rate_and_defense_with_one_meaning_of_rate(scale):
    spec, entries, grid = plan("matrix", scale, Context(scale, {}, TROJAN))
    assert len(entries) == len(MATRIX_ATTACKS) * len(MATRIX_RATES) * len(MATRIX_DEFENSES) == 165
    skipped = {e.key: e.skip for e in entries if e.skip}
    # a clean-label attack cannot poison 20% of the set from a class that is 10% of it, nor
    # 10% of a random slice, whose class 0 holds 486 of 5,000 (the run's own check refused it)
    rates = ("20%", "10%") if scale == "slice" else ("20%",)
    assert set(skipped) == {f"{a}/{r} {d}" for a in ("SIG", "CL") for r in rates for d in MATRIX_DEFENSES}
    total = 5000 if scale == "slice" else 50000
    assert f"is {round(0.2 * total):,} images, all of the target class" in skipped["SIG/20% abl"]
    cells = grid.cells(threads=1)
    assert len(cells) == 165 - 3 * 2 * len(rates)
    defenses = {}
    for cell in cells:
        exp = build_experiment(copy.deepcopy(cell.raw))
        resolved = exp.resolved()
        assert resolved["attack"]["rate_of"] == "dataset" and resolved["attack"]["control"] is True
        defenses.setdefault(resolved["defense"]["name"], []).append(resolved["defense"])
        assert (cell.raw.get("slice") == {"train": 5000, "test": 2000, "seed": 0}) == (scale == "slice")
    assert {d["preset"] for d in defenses["abl"]} == {"default"}
    none = defenses["none"][0]
    for d in defenses["abl"]:  # one control model for the three defenses: ABL's backdoor is none's schedule
        assert {k: d["backdoor"][k] for k in ("epochs", "lr", "milestones")} == \
            {k: none[k] for k in ("epochs", "lr", "milestones")}
    assert all({**c, "name": "none"} == none for c in defenses["clean"])
    if scale == "slice":  # the CPU tests' schedule, one definition in the library
        assert slice_schedule.ABL_DEFAULT_SLICE is reproduce.ABL_DEFAULT_SLICE
        assert none["epochs"] == reproduce.NONE_SAME_LENGTH["epochs"] == 31
        assert all(d["recovery_epochs"] == 8 and d["unlearning_epochs"] == 3 for d in defenses["abl"])
    else:
        assert none["epochs"] == 100 and none["milestones"] == [20, 70]


def test_reproduce_matrix_dry_run_prints_every_cell_and_why_some_are_not_run(capsys):
    from abl.cli import main

    assert main(["reproduce", "matrix", "--dry-run", "--rows", "BadNets", "SIG", "Trojan"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "BadNets/0.5% clean: attack badnets rate 0.005, defense clean, 1 run(s)" in out
    assert any(line.startswith("SIG/20% none: not run: SIG is clean-label") for line in out)
    assert any(line.startswith("Trojan/1% abl: not run: Trojan needs the authors' trigger file") for line in out)
    assert out[-1] == "matrix at scale slice: 45 cells, 24 run(s), 21 not run"
    assert main(["reproduce", "list"]) == 0
    assert any(line.startswith("matrix: Threat matrix") and line.endswith("[ours only: no paper numbers]")
               for line in capsys.readouterr().out.splitlines())


def test_the_matrix_table_shows_each_column_and_marks_cells_not_run(tmp_path):
    """A 2 x 1 x 3 sub-grid on digits, run in-process (no Ray), through the matrix's renderer."""
    overrides = ["dataset={name: digits}", "model={name: small_cnn, width: 4}", "slice=null",
                 f"output.cache_dir={tmp_path / 'cache'}"]
    spec, entries, grid = plan("matrix", "slice", Context("slice", {}, TROJAN), rows=["BadNets", "SIG"],
                               cols=["5% none", "5% clean", "5% abl", "20% none"], overrides=overrides)
    tiny_abl = {"name": "abl", "isolation_epochs": 2, "isolation_rate": 0.05, "recovery_epochs": 1,
                "recovery_milestones": [], "unlearning_epochs": 1, "backdoor": {"epochs": 2, "milestones": []}}
    for e in entries:
        if e.skip is None:
            e.values["defense"] = tiny_abl if e.col.endswith("abl") else {**e.values["defense"], "epochs": 2,
                                                                          "milestones": []}
    grid.variants = [(e.key, e.values) for e in entries if e.skip is None]
    cells = grid.cells(threads=1)
    store = RunStore(tmp_path / "runs")
    records, failed = {}, {}
    for cell in cells:
        if cell.values["variant"] == "SIG/5% abl":  # a cell that fails at run time shows its reason
            failed[cell.cell_id] = "boom: class 0 holds too few"
            continue
        records[cell.cell_id] = run_experiment(build_experiment(copy.deepcopy(cell.raw)), store)
    result = SweepResult(grid, cells, records, 0, failed, 0.0)
    markdown, stats = render_matrix(spec, entries, grid, result, "slice", "abl reproduce matrix")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): [c.strip() for c in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| attack")}
    assert len(rows) == 8
    by_variant = {c.values["variant"]: records[c.cell_id] for c in cells if c.cell_id in records}
    abl = by_variant["BadNets/5% abl"]
    row = rows[("BadNets", "5%", "abl")]
    n = abl.metrics["attack"]["n_poison"]
    assert row[3] == str(int(n)) == rows[("SIG", "5%", "none")][3]  # one meaning of rate: the same count
    assert row[4] == f"{100 * abl.final_metrics['clean_acc']:.2f}" and row[5] == f"{100 * abl.final_metrics['asr']:.2f}"
    assert row[6] == f"{100 * abl.final_metrics['control_asr']:.2f}"
    assert row[7] == f"{100 * abl.final_metrics['iso_precision']:.2f}"
    assert row[9] == f"{100 * abl.metrics['isolation']['clean_acc']:.2f} / {100 * abl.metrics['isolation']['asr']:.2f}"
    assert row[11] == f"{100 * abl.metrics['unlearning']['clean_acc']:.2f} / {100 * abl.metrics['unlearning']['asr']:.2f}"
    assert rows[("BadNets", "5%", "none")][7] == "–"  # no isolation without ABL
    assert rows[("SIG", "5%", "abl")][-1] == "not run: boom: class 0 holds too few"
    assert rows[("SIG", "20%", "none")][-1].startswith("not run: SIG is clean-label")
    assert stats["BadNets/5% clean"]["asr"] is not None


def test_table10_records_the_clean_model_control_from_one_model_for_the_whole_table():
    spec, entries, grid = plan("table10", "slice", Context("slice", {}, TROJAN))
    cells = grid.cells(threads=1)
    assert cells and all(c.raw["attack"]["control"] is True for c in cells)
    baseline = next(c.raw["defense"] for c in cells if c.raw["defense"]["name"] == "none")
    for c in cells:
        if c.raw["defense"]["name"] == "abl":  # ABL's control schedule is the baseline's
            assert c.raw["defense"]["backdoor"] == {k: v for k, v in baseline.items() if k != "name"}
    from types import SimpleNamespace

    runs = [SimpleNamespace(final_metrics={"control_asr": 0.25}), SimpleNamespace(final_metrics={"control_asr": 0.5})]
    assert spec.columns(runs) == {"ASR (clean model)": "37.50"} and spec.columns([]) == {}


def test_table_only_tabulates_the_finished_cells_and_runs_nothing(tmp_path, monkeypatch):
    """A grid run in parts (the slice matrix takes hours of a CPU): ``collect_sweep`` finds
    the cells a sweep worker finished in the store, starts no Ray, and the others read
    "not run yet"."""
    from abl import sweep
    from abl.sweep import collect_sweep, ingest, run_cell

    overrides = ["dataset={name: digits}", "model={name: small_cnn, width: 4}", "slice=null",
                 f"output.cache_dir={tmp_path / 'cache'}"]
    spec, entries, grid = plan("matrix", "slice", Context("slice", {}, TROJAN), rows=["BadNets"],
                               cols=["5% none", "5% clean"], overrides=overrides)
    for e in entries:
        e.values["defense"] = {**e.values["defense"], "epochs": 2, "milestones": []}
    grid.variants = [(e.key, e.values) for e in entries]
    first, second = grid.cells(threads=1)
    store = RunStore(tmp_path / "runs")
    info = {"grid": grid.name, "values": {"variant": first.values["variant"]}}
    ingest(store, run_cell(copy.deepcopy(first.raw), first.cell_id, info, str(tmp_path / "work" / first.cell_id)))

    def no_ray():
        raise AssertionError("collect_sweep started Ray")

    monkeypatch.setattr(sweep, "_import_ray", no_ray)
    result = collect_sweep(grid, tmp_path / "runs")
    assert set(result.records) == {first.cell_id} and not result.failed
    markdown, _ = render_matrix(spec, entries, grid, result, "slice", "abl reproduce matrix --table-only")
    rows = {line.split("|")[3].strip(): line for line in markdown.splitlines() if line.startswith("| BadNets")}
    done = result.records[first.cell_id]
    assert f"| {100 * done.final_metrics['clean_acc']:.2f} |" in rows[first.values["variant"].split(" ", 1)[1]]
    assert rows[second.values["variant"].split(" ", 1)[1]].rstrip(" |").endswith("not run yet")


def test_table_only_without_the_runs_folder_is_one_line(tmp_path, capsys):
    from abl.cli import main

    code = main(["reproduce", "matrix", "--table-only", "--rows", "BadNets", "--runs-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "does not exist: run the grid first" in err[0]
    assert not (tmp_path / "out").exists()

"""``abl reproduce`` (issue 12): the appendix tables and figures as grids, written beside the
paper's numbers. The planning tests validate every cell of every table and figure at both
scales; the run tests reproduce Table 7, Table 8 and Figures 6 and 7 on real CIFAR-10 (a
1,000-image slice, shortened further with ``--set``) through the command line and a local Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from abl import paper
from abl.errors import ConfigError
from abl.reproduce import TABLES, Context, plan
from abl.store import RunStore

CLI = "import sys; from abl.cli import main; sys.exit(main(sys.argv[1:]))"
REPO = Path(__file__).resolve().parents[1]
TRIGGER = REPO.parent / "shared" / "data" / "triggers" / "abl-official-trojan-cifar10.npz"


@pytest.mark.parametrize("scale", ["slice", "full"])
@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_cell_of_every_table_is_a_valid_experiment_with_the_papers_value(table, scale):
    if not TRIGGER.is_file():
        pytest.fail(f"{TRIGGER} is missing: the reproduce tests need ../shared beside the repo")
    ctx = Context(scale, {"cifar10": "/data/cifar10", "gtsrb": "/data/gtsrb"}, str(TRIGGER))
    spec, entries, grid = plan(table, scale, ctx)
    cells = grid.cells(threads=1)  # builds and validates every experiment
    assert len(cells) == len([e for e in entries if e.skip is None])
    values = {e.key: e.paper for e in entries}
    if table == "table7":
        assert values["CIFAR-10/gamma 0.0"] == {"iso_precision": paper.TABLE7["cifar10"][0.0]}
        assert values["GTSRB/gamma 0.5"] == {"iso_precision": paper.TABLE7["gtsrb"][0.5]}
    if table == "table8":
        assert values["ABL (GGA)/model-based"] == {"asr": 3.04, "clean_acc": 86.11}
    if table == "table6":
        assert values["40/Dynamic"] == {"asr": 19.15, "clean_acc": 83.44}
    for cell in cells:
        sl = cell.raw.get("slice")
        assert (sl == {"train": 5000, "test": 2000, "seed": 0}) if scale == "slice" else sl is None
        if cell.raw["defense"]["name"] == "abl" and table != "matrix":  # the matrix: the default (test_matrix.py)
            assert cell.raw["defense"]["preset"] == "paper"
            want = {"slice": 12, "full": None}[scale]
            turning = cell.raw["defense"].get("isolation_epochs")
            if table != "table6":
                assert turning == want
        det = cell.raw["defense"].get("detector") or {}
        if table != "table7" and det.get("name") in ("lga_batch", "flooding", "label_smoothing"):  # ABL's schedule
            assert det["epochs"] == {"slice": 12, "full": 20}[scale] and det["lr"] == 0.1
    if spec.figure:  # the appendix has no numbers for its figures: nothing to compare with
        assert all(e.paper == {} for e in entries)
    if table == "figure6":
        assert [c.raw["attack"]["rate"] for c in cells] == [0.01, 0.05, 0.1]
        assert {c.raw["defense"]["name"] for c in cells} == {"none"}
    if table == "figure8":
        assert {e.row for e in entries} == {"ABL (LGA)", "Flooding 0.5"}
        flood = next(c for c in cells if (c.raw["defense"].get("detector") or {}).get("name") == "flooding")
        assert flood.raw["defense"]["detector"]["gamma"] == 0.5  # appendix B.6: "the flooding level is set to 0.5"
    if table in ("figure8", "figure9"):  # every row names its isolation, ABL's own LGA as the preset runs it
        lga = [c.raw["defense"]["detector"] for c in cells if c.raw["defense"]["detector"]["name"] == "lga_batch"]
        assert len(lga) == len(cells) // len({e.row for e in entries})
        assert all(d["gamma"] == 0.5 and d["ranking"] == "eval" and d["rank_epochs"] == 1 for d in lga)
    if table == "figure9":
        values = sorted(c.raw["defense"]["detector"]["smoothing_value"] for c in cells
                        if c.raw["defense"]["detector"]["name"] == "label_smoothing")
        assert set(values) == {0.2, 0.4}  # appendix B.6: "even with the smoothing value set to 0.4"
    if table == "figure7":
        assert {e.row for e in entries} == {"ABL (LGA)", "AC", "SSA"} and len({e.col for e in entries}) == 6


def test_one_override_shortens_the_isolation_of_every_figure8_row():
    """Figures 8/9 swap ABL's isolation: one ``--set defense.detector.epochs`` must reach every row."""
    ctx = Context("slice", {"cifar10": "/data/cifar10"}, str(TRIGGER))
    _, _, grid = plan("figure8", "slice", ctx, overrides=["defense.detector.epochs=3"])
    cells = grid.cells(threads=1)
    assert {c.raw["defense"]["detector"]["name"] for c in cells} == {"lga_batch", "flooding"}
    assert {c.raw["defense"]["detector"]["epochs"] for c in cells} == {3}


def test_tables_that_need_a_missing_input_say_so_instead_of_running():
    spec, entries, grid = plan("table10", "slice", Context("slice", {}, None))
    skipped = {e.key: e.skip for e in entries if e.skip}
    assert set(skipped) == {"Baseline/Trojan", "ABL/Trojan"}
    assert "--trojan-trigger" in skipped["ABL/Trojan"]


@pytest.mark.parametrize("table, needle", [
    ("table3", "unknown table 'table3'"),
    ("table9", "table9 is not reproduced by `abl reproduce` yet"),
])
def test_an_unknown_or_missing_table_is_refused(table, needle):
    with pytest.raises(ConfigError) as err:
        plan(table, "slice", Context("slice"))
    assert needle in str(err.value)


def test_an_unknown_row_is_refused_with_the_rows():
    with pytest.raises(ConfigError, match="table7 has no row 'CIFAR'; its rows: CIFAR-10, GTSRB, ImageNet subset"):
        plan("table7", "slice", Context("slice"), rows=["CIFAR"])
    with pytest.raises(ConfigError, match="figure8 has no column 'WaNet'; its columns: BadNets, Trojan, Blend, Dynamic"):
        plan("figure8", "slice", Context("slice"), cols=["WaNet"])
    spec, entries, grid = plan("figure9", "slice", Context("slice"), rows=["LS 0.4"], cols=["BadNets", "Blend"])
    assert [e.key for e in entries] == ["LS 0.4/BadNets", "LS 0.4/Blend"] and len(grid.cells()) == 2


def _reproduce(tmp_path: Path, cifar10_root: Path, *args: str) -> subprocess.CompletedProcess:
    # the decoded CIFAR-10 tensors the other real-data tests use, but a stage cache of this
    # test's own, so that a stage left by an earlier run never turns a miss into a hit
    cache = tmp_path / "cache"
    shared = REPO / ".cache" / "test-cache" / "datasets"
    shared.mkdir(parents=True, exist_ok=True)
    if not cache.exists():  # a test may call this twice: one cache for both commands
        cache.mkdir()
        (cache / "datasets").symlink_to(shared, target_is_directory=True)
    cmd = [sys.executable, "-c", CLI, "reproduce", *args, "--root", f"cifar10={cifar10_root}",
           "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--num-cpus", "2",
           "--set", "slice.train=1000", "--set", "slice.test=500", "--set", f"output.cache_dir={cache}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _rows(markdown: str) -> dict[str, list[str]]:
    """The table's body rows by "row/column" (the header, followed by ``|---``, left out)."""
    rows = {}
    lines = markdown.splitlines()
    for line, after in zip(lines, lines[1:] + [""]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 3 and not after.startswith("|---"):
            rows[f"{cells[0]}/{cells[1]}"] = cells[2:]
    return rows


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_reproduce_table7_on_a_cifar10_slice_writes_ours_beside_the_papers(tmp_path, cifar10_root):
    out = _reproduce(tmp_path, cifar10_root, "table7", "--rows", "CIFAR-10", "--set", "defense.detector.epochs=2")
    assert out.returncode == 0, out.stdout + out.stderr
    table = (tmp_path / "out" / "table7-slice.md").read_text()
    assert "Scale: **slice** (1,000 training / 500 test images). Device: cpu." in table
    rows = _rows(table)
    runs = {r.config["sweep"]["values"]["variant"]: r for r in RunStore(tmp_path / "runs").list_runs(status="finished")}
    assert set(runs) == {f"CIFAR-10/gamma {g}" for g in (0.0, 0.5, 1.0, 1.5)}
    for key, rec in runs.items():
        gamma = float(key.split()[-1])
        assert rec.config["defense"]["detector"] == {**rec.config["defense"]["detector"], "gamma": gamma, "epochs": 2}
        ours = 100 * rec.final_metrics["iso_precision"]
        paper_value = paper.TABLE7["cifar10"][gamma]
        assert rows[key] == [f"{ours:.2f}", f"{paper_value:.2f}", f"{ours - paper_value:+.2f}"]
    assert (tmp_path / "out" / "table7-slice.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_reproduce_table8_shares_one_isolation_between_its_unlearners(tmp_path, cifar10_root):
    out = _reproduce(tmp_path, cifar10_root, "table8", "--rows", "ABL (GGA)", "Finetuning All Layers",
                     "--set", "defense.isolation_epochs=2", "--set", "defense.recovery_epochs=1",
                     "--set", "defense.recovery_milestones=[]", "--set", "defense.unlearner.epochs=1")
    assert out.returncode == 0, out.stdout + out.stderr
    recs = RunStore(tmp_path / "runs").list_runs(status="finished")
    assert sorted(r.metrics["isolation"]["stage_hit"] for r in recs) == [0.0, 1.0]
    rows = _rows((tmp_path / "out" / "table8-slice.md").read_text())
    gga = next(r for r in recs if r.config["defense"]["unlearner"]["name"] == "gga")
    assert gga.config["defense"]["unlearner"]["lr"] == 0.0001 and gga.config["defense"]["preset"] == "paper"
    asr = 100 * gga.final_metrics["asr"]
    assert rows["ABL (GGA)/model-based"][:3] == [f"{asr:.2f}", "3.04", f"{asr - 3.04:+.2f}"]
    assert re.search(r"\| Finetuning All Layers \| model-based \| \d+\.\d\d \| 100\.00 \|", (tmp_path / "out" / "table8-slice.md").read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_reproduce_figure6_draws_the_loss_of_backdoor_and_clean_examples_per_rate(tmp_path, cifar10_root):
    out = _reproduce(tmp_path, cifar10_root, "figure6", "--set", "defense.epochs=3", "--set", "defense.milestones=[]")
    assert out.returncode == 0, out.stdout + out.stderr
    md = (tmp_path / "out" / "figure6-slice.md").read_text()
    assert "The paper gives this as a figure only" in md and "(paper)" not in md
    rows = _rows(md)
    runs = {r.config["sweep"]["values"]["variant"]: r for r in RunStore(tmp_path / "runs").list_runs(status="finished")}
    assert set(runs) == set(rows) == {"1%/BadNets", "5%/BadNets", "10%/BadNets"}
    for key, rec in runs.items():
        losses, mask = rec.array("example_losses"), rec.array("poison_mask").astype(bool)
        assert losses.shape == (3, 1000) and mask.sum() == round(float(key.split("%")[0]) * 10)
        poisoned, clean = losses[:, mask].mean(1), losses[:, ~mask].mean(1)
        # the columns: ASR, CA, then the mean losses per epoch read from the run's own arrays
        assert rows[key][0] == f"{100 * rec.final_metrics['asr']:.2f}"
        assert rows[key][2] == f"{poisoned[0]:.3f} / {clean[0]:.3f}" and rows[key][3] == f"{poisoned[1]:.3f} / {clean[1]:.3f}"
    assert (tmp_path / "out" / "figure6-slice.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_reproduce_figure7_scores_three_detectors_and_shares_the_backdoored_model(tmp_path, cifar10_root):
    names = {"lga_batch": "ABL (LGA)", "activation_clustering": "AC", "spectral_signatures": "SSA"}
    md = tmp_path / "out" / "figure7-slice.md"
    # ABL's own isolation trains its model (2 epochs here)
    out = _reproduce(tmp_path, cifar10_root, "figure7", "--cols", "BadNets", "--rows", "ABL (LGA)",
                     "--set", "defense.detector.epochs=2")
    assert out.returncode == 0, out.stdout + out.stderr
    (abl,) = RunStore(tmp_path / "runs").list_runs(status="finished")
    assert abl.config["defense"]["detector"] == {**abl.config["defense"]["detector"], "name": "lga_batch", "gamma": 0.5,
                                                 "epochs": 2, "lr": 0.1}
    assert _rows(md.read_text())["ABL (LGA)/BadNets"] == [f"{100 * abl.final_metrics['iso_precision']:.2f}"]
    # AC and SSA score one no-defense backdoored model (3 epochs here): trained by the first
    # of them, read from the stage cache by the other
    out = _reproduce(tmp_path, cifar10_root, "figure7", "--cols", "BadNets", "--rows", "AC", "SSA",
                     "--set", "defense.backdoor.epochs=3", "--set", "defense.backdoor.milestones=[]")
    assert out.returncode == 0, out.stdout + out.stderr
    recs = [r for r in RunStore(tmp_path / "runs").list_runs(status="finished") if r.run_id != abl.run_id]
    by_row = {names[r.config["defense"]["detector"]["name"]]: r for r in recs}
    assert len(recs) == 2 and set(by_row) == {"AC", "SSA"}
    assert sorted(r.metrics["backdoored"]["stage_hit"] for r in recs) == [0.0, 1.0]
    rows = _rows(md.read_text())
    for label, rec in by_row.items():
        assert rows[f"{label}/BadNets"] == [f"{100 * rec.final_metrics['iso_precision']:.2f}"]
    assert (tmp_path / "out" / "figure7-slice.png").stat().st_size > 5000


def test_reproduce_list_names_every_table_and_what_is_missing(capsys):
    from abl.cli import main

    assert main(["reproduce", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("table6", "table7", "table8", "table10", "table11", "figure6", "figure7", "figure8", "figure9"):
        assert f"{name}: " in out and f"{name}: not in" not in out
    assert "table9: not in abl reproduce yet" in out

"""`abl demo` on the bundled digits: the backdoor is learned without defense and removed by ABL."""

from __future__ import annotations

from abl.demo import run_demo


def test_demo_end_to_end(tmp_path):
    records, report = run_demo(tmp_path / "demo")
    by_name = {r.name: r for r in records}
    none, abl = by_name["demo-none"].final_metrics, by_name["demo-abl"].final_metrics
    assert all(r.status == "finished" for r in records)
    assert none["asr"] >= 0.95 and none["clean_acc"] >= 0.95, none
    # issue 25's criterion: ABL's CA within 2 points of the no-defense run, ASR <= 5%. The
    # default (isolation count from the scores, the digits' own augmentation: none) gave
    # CA 98.22% / ASR 0.49% against 99.11% / 100% on 2026-12-07; with the fixed 1% and
    # the paper's augmentation it was 89.1% (benchmarks/README.md)
    assert abl["asr"] <= 0.05 and abl["clean_acc"] >= none["clean_acc"] - 0.02, (none, abl)
    assert abl["iso_precision"] >= 0.90 and abl["iso_evidence"] == 1.0, abl
    text = report.read_text()
    assert "demo-abl" in text and "Isolation precision" in text
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert any(p.endswith("-isolated.png") for p in pngs)
    assert sum(p.endswith("-loss.png") for p in pngs) == 2

"""`abl demo` on the bundled digits: the backdoor is learned without defense and removed by ABL."""

from __future__ import annotations

from abl.demo import run_demo


def test_demo_end_to_end(tmp_path):
    records, report = run_demo(tmp_path / "demo")
    by_name = {r.name: r for r in records}
    none, abl = by_name["demo-none"].final_metrics, by_name["demo-abl"].final_metrics
    assert all(r.status == "finished" for r in records)
    assert none["asr"] >= 0.95 and none["clean_acc"] >= 0.95, none
    # default ABL, recovery shortened: CA 90.9%, ASR 3.7% on 2026-11-27 (benchmarks/README.md)
    assert abl["asr"] <= 0.10 and abl["clean_acc"] >= 0.85, abl
    assert abl["iso_precision"] >= 0.75, abl
    text = report.read_text()
    assert "demo-abl" in text and "Isolation precision" in text
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert any(p.endswith("-isolated.png") for p in pngs)
    assert sum(p.endswith("-loss.png") for p in pngs) == 2

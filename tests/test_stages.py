"""Shared stages (issue 9): the backdoored model is trained once and cached by the hash of
its inputs; a second run with the same inputs trains nothing, and a change to any input
(data, attack, slice, model, seed, schedule) trains again. Exercised through the
``detect`` defense (a detector on the backdoored model: the paper's Figure 7)."""

from __future__ import annotations

import copy

import pytest
import torch

from abl.experiment import build_experiment, resume_experiment, run_experiment
from abl.store import RunStore

BASE = {
    "name": "stage",
    "seed": 0,
    "dataset": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 8},
    "attack": {"name": "badnets", "rate": 0.1, "target": 0},
    "defense": {"name": "detect", "detector": {"name": "spectral_signatures"}, "rate": 0.05,
                "backdoor": {"epochs": 6, "milestones": [4]}},
    "train": {"batch_size": 64, "eval_subset": 0, "progress": False, "threads": 1, "checkpoint_every_s": 0},
}


def _run(tmp_path, cache, change=None, **kw):
    raw = copy.deepcopy(BASE)
    for path, value in (change or {}).items():
        node = raw
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    raw["output"] = {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(cache), "save_model": True}
    return run_experiment(build_experiment(raw), RunStore(tmp_path / "runs"), **kw)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage-first")
    cache = tmp / "cache"
    return _run(tmp, cache), cache, tmp


def test_the_first_run_trains_and_caches_the_backdoored_model(first):
    rec, cache, _ = first
    assert rec.final_metrics["asr"] > 0.9, "the backdoor is planted"
    assert rec.metrics["backdoored"]["stage_hit"] == 0.0
    assert [h["phase"] for h in rec.history()] == ["backdoor"] * 6
    (stage,) = rec.json("stages").values()
    assert stage["hit"] is False
    assert (cache / "stages" / f"backdoored-{stage['key']}.safetensors").is_file()
    # spectral signatures on a planted BadNets backdoor, against the 10% base rate (measured
    # 36% precision at 5%; the detectors' own tests hold their quality)
    assert rec.final_metrics["iso_precision"] > 0.2 and rec.final_metrics["iso_auprc"] > 0.1


def test_a_second_run_reuses_it_and_trains_nothing(first, tmp_path):
    rec, cache, _ = first
    again = _run(tmp_path, cache)
    assert again.history() == [], "no epoch trained"
    assert again.metrics["backdoored"]["stage_hit"] == 1.0
    assert again.json("stages") == {"backdoored": {**rec.json("stages")["backdoored"], "hit": True}}
    for k in ("clean_acc", "asr", "iso_precision", "iso_auprc"):
        assert again.final_metrics[k] == pytest.approx(rec.final_metrics[k], abs=1e-6), k
    assert (again.array("isolated_indices") == rec.array("isolated_indices")).all()
    a, b = rec.tensors("model"), again.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"attack.rate": 0.05},
        {"attack.target": 3},
        {"model.width": 12},
        {"defense.backdoor.epochs": 5},
        {"defense.backdoor.lr": 0.05},
        {"train.batch_size": 32},
        {"dataset.size": 12},
    ],
)
def test_any_changed_input_trains_a_new_backdoored_model(first, tmp_path, change):
    rec, cache, _ = first
    other = _run(tmp_path, cache, change)
    assert other.metrics["backdoored"]["stage_hit"] == 0.0, change
    assert other.json("stages")["backdoored"]["key"] != rec.json("stages")["backdoored"]["key"]
    assert any(h["phase"] == "backdoor" for h in other.history())


def test_a_run_stopped_in_the_stage_resumes_it(tmp_path, first):
    rec, _, _ = first
    cache = tmp_path / "fresh-cache"

    class Stop(KeyboardInterrupt):
        pass

    def stop(record):
        if record["phase_epoch"] == 3:
            raise Stop()

    with pytest.raises(Stop):
        _run(tmp_path, cache, on_epoch=stop)
    (stopped,) = RunStore(tmp_path / "runs").list_runs()
    assert not list((cache / "stages").glob("*.safetensors")), "a half-trained model is never cached"
    resumed = resume_experiment(stopped.run_id, RunStore(tmp_path / "runs"))
    assert resumed.json("stages")["backdoored"]["key"] == rec.json("stages")["backdoored"]["key"]
    assert resumed.final_metrics["iso_precision"] == rec.final_metrics["iso_precision"]
    a, b = rec.tensors("model"), resumed.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the isolation stage (ABL with ``cache_stages``): one isolation, many unlearners -------

ABL = {"name": "abl", "isolation_count": "fixed", "isolation_epochs": 4, "isolation_lr": 0.05, "recovery_epochs": 2, "recovery_lr": 0.05,
       "unlearning_epochs": 3, "isolation_rate": 0.05}


def _abl(tmp_path, cache, defense: dict, **kw):
    return _run(tmp_path, cache, {"defense": defense}, **kw)


@pytest.fixture(scope="module")
def isolated_first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iso-first")
    cache = tmp / "cache"
    return _abl(tmp, cache, {**ABL, "cache_stages": True}), cache, tmp


def test_an_unlearner_run_on_a_cached_isolation_trains_only_its_unlearning(isolated_first, tmp_path):
    rec, cache, _ = isolated_first
    assert rec.metrics["isolation"]["stage_hit"] == 0.0
    (stage,) = list((cache / "stages").glob("isolated-*.safetensors"))
    other = _abl(tmp_path, cache, {**ABL, "cache_stages": True, "unlearner": {"name": "finetune_all", "epochs": 2}})
    assert other.metrics["isolation"]["stage_hit"] == 1.0
    assert other.json("stages")["isolated"] == {"key": rec.json("stages")["isolated"]["key"], "hit": True}
    phases = [h["phase"] for h in other.history()]
    assert phases == ["isolation"] * 4 + ["recovery"] * 2 + ["unlearning"] * 2, "the cached phases are in its record"
    assert sum(h["time_s"] for h in other.history()[:6]) == pytest.approx(sum(h["time_s"] for h in rec.history()[:6]))
    assert (other.array("isolated_indices") == rec.array("isolated_indices")).all()
    for k in ("iso_precision", "iso_separation"):
        assert other.metrics["isolation"][k] == rec.metrics["isolation"][k]
    assert other.json("notes")["unlearner"]["name"] == "finetune_all"


def test_a_cached_isolation_ends_exactly_as_an_uncached_run(isolated_first, tmp_path):
    """The phase count and data order after a cached stage are those of a run that trained
    it: the same config with and without the cache gives bit-identical weights."""
    rec, cache, _ = isolated_first
    hit = _abl(tmp_path, cache, {**ABL, "cache_stages": True})
    assert hit.metrics["isolation"]["stage_hit"] == 1.0
    plain = _abl(tmp_path, tmp_path / "no-cache", ABL)
    assert "isolation" in plain.metrics and "stage_hit" not in plain.metrics["isolation"], "not cached by default"
    for other in (hit, plain):
        a, b = rec.tensors("model"), other.tensors("model")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert other.final_metrics["asr"] == rec.final_metrics["asr"]


@pytest.mark.parametrize(
    "change",
    [{"recovery_lr": 0.02}, {"isolation_rate": 0.02}, {"gamma": 0.3}, {"detector": {"name": "cross_entropy", "epochs": 4}}],
)
def test_a_changed_isolation_input_isolates_again(isolated_first, tmp_path, change):
    rec, cache, _ = isolated_first
    other = _abl(tmp_path, cache, {**ABL, "cache_stages": True, **change})
    assert other.metrics["isolation"]["stage_hit"] == 0.0, change
    assert other.json("stages")["isolated"]["key"] != rec.json("stages")["isolated"]["key"]


def test_a_run_on_a_cached_isolation_resumes_mid_unlearning(isolated_first, tmp_path):
    rec, cache, _ = isolated_first

    class Stop(KeyboardInterrupt):
        pass

    def stop(record):
        if record["phase"] == "unlearning" and record["phase_epoch"] == 1:
            raise Stop()

    with pytest.raises(Stop):
        _abl(tmp_path, cache, {**ABL, "cache_stages": True}, on_epoch=stop)
    (stopped,) = RunStore(tmp_path / "runs").list_runs()
    resumed = resume_experiment(stopped.run_id, RunStore(tmp_path / "runs"))
    assert [h["phase"] for h in resumed.history()] == [h["phase"] for h in rec.history()]
    a, b = rec.tensors("model"), resumed.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the isolation phase alone: runs that differ only after the scoring share it ----------


# values no other test of this module uses, so that no earlier test cached their whole stage
@pytest.mark.parametrize("change", [{"isolation_rate": 0.03}, {"recovery_lr": 0.03, "recovery_epochs": 3}])
def test_a_run_differing_after_the_scoring_reuses_the_isolation_phase(isolated_first, tmp_path, change):
    """A new isolation count or recovery schedule misses the isolation+recovery stage but
    reads the isolation phase's scores: it trains no isolation epoch, and ends bit-identical
    to the same config trained from scratch without the cache."""
    rec, cache, _ = isolated_first
    scored_key = rec.json("stages")["scored"]["key"]
    assert (cache / "stages" / f"scored-{scored_key}.safetensors").is_file(), "the first run cached its scores"
    other = _abl(tmp_path, cache, {**ABL, "cache_stages": True, **change})
    iso = other.metrics["isolation"]
    assert iso["stage_hit"] == 0.0 and iso["scores_hit"] == 1.0
    assert other.json("stages")["scored"] == {"key": rec.json("stages")["scored"]["key"], "hit": True}
    phases = [h["phase"] for h in other.history()]
    assert phases.count("isolation") == 4, "the cached isolation epochs are in its record"
    plain = _abl(tmp_path, tmp_path / "no-cache", {**ABL, **change})
    a, b = plain.tensors("model"), other.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (other.array("isolated_indices") == plain.array("isolated_indices")).all()
    for k in ("iso_precision", "iso_recall", "iso_separation", "clean_acc", "asr"):
        assert other.metrics["isolation"][k] == plain.metrics["isolation"][k], k
    assert other.final_metrics["asr"] == plain.final_metrics["asr"]


def test_a_changed_isolation_phase_scores_again(isolated_first, tmp_path):
    rec, cache, _ = isolated_first
    other = _abl(tmp_path, cache, {**ABL, "cache_stages": True, "gamma": 0.35})
    assert other.metrics["isolation"].get("scores_hit", 0.0) == 0.0
    assert other.json("stages")["scored"]["key"] != rec.json("stages")["scored"]["key"]


def test_a_run_on_cached_scores_resumes_mid_recovery(isolated_first, tmp_path):
    rec, cache, _ = isolated_first

    class Stop(KeyboardInterrupt):
        pass

    def stop(record):
        if record["phase"] == "recovery" and record["phase_epoch"] == 1:
            raise Stop()

    change = {"isolation_rate": 0.04}
    with pytest.raises(Stop):
        _abl(tmp_path, cache, {**ABL, "cache_stages": True, **change}, on_epoch=stop)
    (stopped,) = RunStore(tmp_path / "runs").list_runs()
    resumed = resume_experiment(stopped.run_id, RunStore(tmp_path / "runs"))
    plain = _abl(tmp_path, tmp_path / "no-cache", {**ABL, **change})
    assert [h["phase"] for h in resumed.history()] == [h["phase"] for h in plain.history()]
    a, b = plain.tensors("model"), resumed.tensors("model")
    assert all(torch.equal(a[k], b[k]) for k in a)

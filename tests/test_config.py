"""Typed config validation, overrides and the registry's error messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from abl.config import apply_overrides, build_dataclass, load_yaml, to_plain
from abl.errors import ConfigError
from abl.experiment import build_experiment
from abl.registry import Registry


@dataclass
class Inner:
    depth: int = 16


@dataclass
class Params:
    lr: float = 0.1
    epochs: int = 10
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    milestones: list[int] = field(default_factory=lambda: [20, 70])
    maybe: float | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_int_widening():
    p = build_dataclass(Params, {"lr": 1, "inner": {"depth": 28}}, "x")
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.inner.depth == 28 and p.milestones == [20, 70]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"lrr": 0.1}, "x.lrr"),
        ({"epochs": 1.5}, "x.epochs"),
        ({"epochs": True}, "x.epochs"),
        ({"flag": "yes"}, "x.flag"),
        ({"mode": "c"}, "x.mode"),
        ({"milestones": [1, "a"]}, "x.milestones[1]"),
        ({"maybe": "a"}, "x.maybe"),
        ({"inner": {"width": 2}}, "x.inner.width"),
        ({"lr": "0.1"}, "x.lr"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        build_dataclass(Params, data, "x")


@dataclass
class Unions:
    count: Literal["fixed", "auto"] | None = None
    augment: bool | Literal["data"] | None = None
    ceiling: float | None = None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"count": 3}, "'x.count' must be 'fixed', 'auto' or null, got 3"),
        ({"augment": "maybe"}, "'x.augment' must be true or false, 'data' or null, got 'maybe'"),
        ({"ceiling": "high"}, "'x.ceiling' must be a number or null, got 'high'"),
    ],
)
def test_union_errors_use_the_config_files_words(data, message):
    # the union's alternatives as a YAML user writes them, not Python's names (bool, NoneType)
    with pytest.raises(ConfigError) as err:
        build_dataclass(Unions, data, "x")
    assert str(err.value) == message


def test_registry_duplicate_and_unknown():
    reg: Registry = Registry("widget")
    reg.register("a")(Params)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(Inner)
    with pytest.raises(ConfigError, match="unknown widget 'b'; known widgets: a"):
        reg.create({"name": "b"})
    with pytest.raises(ConfigError, match="widget.name"):
        reg.create({"lr": 0.1})
    made = reg.create("a")
    assert isinstance(made, Params) and to_plain(made)["name"] == "a"


def test_overrides():
    raw = {"attack": "badnets", "defense": {"name": "abl"}}
    apply_overrides(raw, ["attack.rate=0.05", "defense.gamma=1", "train.batch_size=64", "name=x"])
    assert raw == {
        "attack": {"name": "badnets", "rate": 0.05},
        "defense": {"name": "abl", "gamma": 1},
        "train": {"batch_size": 64},
        "name": "x",
    }
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])


def _raw(**over):
    raw = {
        "dataset": {"name": "digits"},
        "model": {"name": "small_cnn"},
        "attack": {"name": "badnets"},
        "defense": {"name": "abl"},
    }
    raw.update(over)
    return raw


def test_experiment_resolves_presets_and_records_them():
    exp = build_experiment(_raw())
    res = exp.resolved()
    assert res["defense"]["isolation_epochs"] == 20 and res["defense"]["unlearning"] == "gga"
    official = build_experiment(_raw(defense={"name": "abl", "preset": "official", "unlearning_lr": 0.001}))
    d = official.resolved()["defense"]
    assert d["isolation_epochs"] == 10 and d["isolation_loss"] == "flooding" and d["unlearning_lr"] == 0.001
    assert d["unlearning"] == "ascent"


@pytest.mark.parametrize(
    "over, message",
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"defense": {"name": "abl", "gamma": -1}}, "defense.gamma"),
        ({"defense": {"name": "abl", "isolation_rate": 2}}, "defense.isolation_rate"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"batch_sise": 64}}, "train.batch_sise"),
        ({"model": {"name": "wrn", "depth": 15}}, "model.depth"),
        ({"attack": {"name": "blend", "alpha": 0}}, "attack.alpha"),
        ({"dataset": {"name": "imagenet9000"}}, "known datasets"),
        ({"defense": {"name": "none", "epochs": "ten"}}, "defense.epochs"),
        ({"seed": "x"}, "'seed'"),
    ],
)
def test_experiment_rejects_bad_configs(over, message):
    with pytest.raises(ConfigError, match=message):
        build_experiment(_raw(**over))


def test_missing_section():
    raw = _raw()
    del raw["model"]
    with pytest.raises(ConfigError, match="'model' is required"):
        build_experiment(raw)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(lst)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_example_configs_exist():
    names = {p.stem for p in CONFIGS}
    for attack in ("badnets", "blend", "trojan", "sig", "cl", "trojannn", "fc", "dynamic", "wanet", "bpp"):
        assert f"cifar10-{attack}-abl" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_configs_validate(path):
    exp = build_experiment(load_yaml(path))
    # Example configs point at real data a user brings (never the demo's bundled digits).
    assert exp.resolved()["dataset"]["name"] in ("cifar10", "gtsrb", "imagefolder", "arrays")

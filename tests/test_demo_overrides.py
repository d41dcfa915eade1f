"""`abl demo --set`: a defense key reaches the runs whose defense has it, and a bad override
stops the demo before anything trains or is written."""

from __future__ import annotations

import pytest

from abl.cli import main
from abl.demo import demo_overrides, run_demo
from abl.errors import ConfigError


def test_an_abl_key_goes_to_the_abl_run_only_and_other_keys_to_both():
    shares = demo_overrides(["defense.isolation_count=auto", "train.threads=1", "defense.recovery_augment=false"])
    assert shares["demo-abl"] == ["defense.isolation_count=auto", "train.threads=1", "defense.recovery_augment=false"]
    # the no-defense run has no isolation count: before, it refused the whole demo
    assert shares["demo-none"] == ["train.threads=1"]


def test_a_key_of_the_no_defense_run_only_goes_there():
    shares = demo_overrides(["defense.milestones=[30]"])
    assert shares == {"demo-none": ["defense.milestones=[30]"], "demo-abl": []}


def test_a_defense_key_neither_run_has_is_one_error_naming_it():
    with pytest.raises(ConfigError, match=r"unknown key 'defense\.isolation_cout'.*isolation_count"):
        demo_overrides(["defense.isolation_cout=auto"])


def test_a_bad_abl_value_stops_the_demo_before_the_no_defense_run_trains(tmp_path):
    with pytest.raises(ConfigError, match="isolation_count"):
        run_demo(tmp_path / "demo", ["defense.isolation_count=sometimes"])
    assert not (tmp_path / "demo").exists()  # nothing half-written presented as a result


def test_cli_bad_demo_override_exits_2_with_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--set", "defense.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'defense.nope'" in err[0], err
    assert not (tmp_path / "d").exists()

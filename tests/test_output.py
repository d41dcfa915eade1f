"""What `abl` prints is readable: `abl list`, `abl report` and warnings fit a terminal,
with whole texts, one number format and no Python internals (issue 27, part B)."""

from __future__ import annotations

import re

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


def test_list_help_names_every_kind(capsys):
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for kind in all_registries():
        assert kind in help_text

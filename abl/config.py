"""Typed, validated experiment configs.

Every component's parameters are dataclass fields with defaults in one place (the
component's own class). :func:`build_dataclass` turns a mapping from YAML into such a
dataclass, rejecting unknown keys and wrong types with the dotted key's name, then
calls the instance's ``validate()`` for value checks. Dotted ``--set key=value``
overrides are applied to the raw mapping before validation, as in big_vision.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from abl.errors import ConfigError

T = TypeVar("T")

MAX_EPOCHS = 10_000
"""Upper bound of every epoch count (a field named ``epochs`` or ``*_epochs``). The longest
schedule in this project is 600 epochs (a surrogate); 10,000 epochs of even the smallest
model here take days, so a larger count is a typo, not a plan."""

MAX_STEPS = 1_000_000
"""Upper bound of every optimisation step count (``steps``, ``*_steps``): the defaults are
at most 1,000 steps; a million is hours of optimisation per use."""

SEED_MAX = 2**32 - 1
"""Seeds (``seed``, ``*_seed``) lie in ``0 .. 2**32 - 1``: numpy's legacy seeding takes no
more, torch and numpy's ``default_rng`` take all of it, and seeds derived by adding an
offset or multiplying by a small prime stay within torch's 64-bit range."""


class _OutOfRange(ConfigError):
    """The value has the right type but is out of bounds: reported as it is, not as a type
    mismatch by the union that tried it."""


def _is_unbounded_ok(where: str) -> bool:
    """Whether the float at ``where`` may be ``+inf``: a ``*ceiling`` (no ceiling)."""
    return where.rsplit(".", 1)[-1].split("[", 1)[0].endswith("ceiling")


def _check_int_bounds(value: int, where: str) -> None:
    """Bounds that every config shares, by the field's name: epochs, steps, seeds."""
    key = where.rsplit(".", 1)[-1]
    if key == "seed" or key.endswith("_seed"):
        _check_seed_range(value, where)
    elif key == "epochs" or key.endswith("_epochs"):
        if value > MAX_EPOCHS:
            raise _OutOfRange(
                f"'{where}' must be at most {MAX_EPOCHS:,}, got {value:,}: the longest schedule here is 600 epochs "
                f"and {MAX_EPOCHS:,} epochs would take days, so a larger count can only be a typo"
            )
    elif key == "steps" or key.endswith("_steps"):
        if value > MAX_STEPS:
            raise _OutOfRange(
                f"'{where}' must be at most {MAX_STEPS:,}, got {value:,}: the defaults take at most 1,000 steps "
                "and a larger count would optimise for hours each time, so it can only be a typo"
            )


def _check_seed_range(value: int, where: str) -> None:
    if not 0 <= value <= SEED_MAX:
        raise _OutOfRange(
            f"'{where}' must be between 0 and {SEED_MAX} (2**32 - 1), got {value}: "
            "the range that every random generator it seeds accepts"
        )


def check_seed(value: Any, where: str) -> int:
    """``value`` as a seed (an integer in ``0 .. SEED_MAX``), else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"'{where}' must be an integer, got {value!r}")
    _check_seed_range(value, where)
    return value


def check_milestones(milestones: Any, epochs: int, where: str) -> None:
    """Learning-rate milestones must be epochs inside the phase (``1 .. epochs - 1``), in
    increasing order: one outside never fires or fires before the first epoch, and an
    unsorted list reads as a schedule it is not."""
    ms = list(milestones or [])
    bad = [m for m in ms if not 0 < m < epochs]
    if bad:
        raise ConfigError(
            f"'{where}' must hold epochs between 1 and {epochs - 1} (the phase has {epochs} epochs), got {ms}: "
            f"milestone {bad[0]} would {'never take effect' if bad[0] >= epochs else 'apply before the first epoch'}"
        )
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ConfigError(f"'{where}' must be in increasing order without repeats, got {ms}")


#: how an error names a type, in the config file's (YAML's) words
_PLAIN_NAMES: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                                type(None): "null", dict: "a mapping", list: "a list"}


def _type_names(tp: Any) -> list[str]:
    """The alternatives ``tp`` allows, as an error names them (a Literal's values one by one)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return [repr(a) for a in typing.get_args(tp)]
    return [_PLAIN_NAMES.get(tp, _PLAIN_NAMES.get(origin, getattr(tp, "__name__", str(tp))))]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except _OutOfRange:
                raise
            except ConfigError as exc:
                errors.append(str(exc))
        names = [n for a in args for n in _type_names(a)]
        names = ", ".join(names[:-1]) + " or " + names[-1]  # a Union has at least two members
        raise ConfigError(f"'{where}' must be {names}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"'{where}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{where}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return build_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        _check_int_bounds(value, where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            raise _OutOfRange(f"'{where}' must be a finite number, got an integer of {len(str(value))} digits") from None
        # inf or nan turns every loss or update it touches into inf or nan (gamma = .inf made
        # isolation pure ascent); only a ceiling may be absent, written .inf
        if math.isnan(number) or (math.isinf(number) and not (number > 0 and _is_unbounded_ok(where))):
            raise _OutOfRange(
                f"'{where}' must be a finite number, got {value}"
                + ("" if not _is_unbounded_ok(where) else " (.inf, meaning no ceiling, is allowed)")
            )
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"'{where}' must be {tp.__name__}, got {value!r}")
    return value


def build_dataclass(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types are errors.

    A class whose unset fields (None) take a preset's value may map such fields to what a
    null *written* in ``data`` means (``null_means``, a class attribute): only here, where
    the keys the user wrote are known, can an explicit ``null`` be told from a missing key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{where}.{unknown[0]}'; valid keys: {', '.join(sorted(fields)) or '(none)'}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    null_means: Mapping[str, Any] = getattr(cls, "null_means", {})
    kwargs.update({k: null_means[k] for k, v in data.items() if v is None and k in null_means})
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a default is missing
        raise ConfigError(f"'{where}': {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def check(cond: bool, where: str, message: str) -> None:
    """Value check used by ``validate()`` methods: raise ConfigError naming the key."""
    if not cond:
        raise ConfigError(f"'{where}' {message}")


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        name = getattr(type(obj), "registered_name", None)
        if name is not None:
            out["name"] = name
        for f in dataclasses.fields(obj):
            if f.init:
                out[f.name] = to_plain(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = safe_load_unique(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config mapping (validation happens afterwards)."""
    for text in overrides:
        path, value = parse_override(text)
        set_path(raw, path, value, f"override '{text}'")
    return raw


def set_path(raw: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    """Set ``raw[path[0]][path[1]]... = value``, making sections on the way; ``where`` names
    the override or axis in the error when a step is not a section."""
    node = raw
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, str) and i == 0:
            # `attack: badnets` shorthand: expand so that attack.rate=... works.
            nxt = node[part] = {"name": nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: '{'.'.join(path[: i + 1])}' is not a section")
        node = nxt
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads YAML 1.2 numbers and refuses a key repeated in one mapping.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e30``,
    ``1E-3``, ``.5e2`` and ``+1e3`` are read as strings; the resolver added below (after the
    class) reads every float form of the YAML 1.2 core schema as a number.

    Plain ``safe_load`` keeps the last value silently, so a setting written twice (say
    ``rate: 0.1`` near the top and ``rate: 0.5`` further down) would run unnoticed with
    whichever came last. Keys brought in by a ``<<`` merge may still be overridden.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (line {key_node.start_mark.line + 1}); keep one of them",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 core floats that YAML 1.1 misses: an exponent without a dot or without a sign.
# Forms with a dot and a signed exponent, and .inf/.nan, already resolve as floats.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^0o[0-7]+$"), ["0"])  # 1.2 octal


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` on a key repeated in a mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with one-line errors for the usual mistakes."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file '{p}' is a directory; give the path of a .yaml file inside it")
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{p}': {exc.strerror or exc}") from None
    try:
        if b"\x00" in raw:  # UTF-16 of ASCII text decodes as UTF-8, NULs and all
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # UTF-16 (a Windows editor's "Unicode") starts with a byte-order mark or holds NUL
        # bytes; Latin-1 shows as a lone byte >= 0x80
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw:
            what = "is UTF-16 (or another encoding that is not UTF-8)"
        else:
            line = raw[: exc.start].count(b"\n") + 1
            what = f"has a byte that is not UTF-8 (0x{raw[exc.start]:02x} on line {line}; Latin-1?)"
        raise ConfigError(f"config file '{p}' {what}; save it as UTF-8") from None
    try:
        data = safe_load_unique(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"config file '{p}' is not valid YAML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return data

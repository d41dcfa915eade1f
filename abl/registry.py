"""One small generic registry used by every kind of component.

A component is a dataclass whose fields are its typed parameters (with the defaults
the paper uses) and whose methods do its work; the registry maps a name to that class
and builds an instance from a plain mapping (a YAML section), validating every key.
The shape follows timm's ``register_model`` / ``create_model``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

from abl.errors import ConfigError, UnknownComponentError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> component class, for one kind of component (``"attack"``, ``"model"``...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@ATTACKS.register("badnets")``. A duplicate name is an error."""

        def add(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = cls
            cls.registered_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UnknownComponentError(
                f"unknown {self.kind} '{name}'; known {self.kind}s: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def create(self, spec: Mapping[str, Any] | str, where: str | None = None) -> T:
        """Build a component from ``{"name": ..., **params}`` (or a bare name).

        Unknown parameter names and wrong types raise :class:`ConfigError` naming the key.
        """
        from abl.config import build_dataclass

        where = where or self.kind
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"'{where}' must be a mapping with a 'name' key, got {type(spec).__name__}")
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"'{where}.name' is required: one of {', '.join(self.names())}")
        cls = self.get(name)
        return build_dataclass(cls, params, where)


class ParamDoc(NamedTuple):
    """One parameter of a component, as ``abl list KIND NAME`` shows it."""

    name: str
    type: str
    default: Any  # dataclasses.MISSING when the parameter is required
    doc: str  # the whole description as plain text, "" when the docstrings do not describe it
    #: preset name -> the value this field takes under it, for a field a preset fills in
    #: (its default is None); empty for every other field
    presets: dict[str, Any] = {}


# ``name: text``, ``a, b: text`` (shared), ``prefix_*: text`` (every field with the prefix)
_NAME = r"[a-z_][a-z0-9_]*\*?"
_ENTRY = re.compile(rf"^(?P<names>{_NAME}(?:, *{_NAME})*): *(?P<text>.*)$")
_NAMES_GO_ON = re.compile(rf"^{_NAME}(?:, *{_NAME})*,$")  # a list of names broken after a comma
_ROLE = re.compile(r":[a-z]+:`~?(?P<target>[^`]+)`")


def plain_text(text: str) -> str:
    """Docstring markup as a reader sees it: ``x`` -> x, :func:`f` -> f."""
    return _ROLE.sub(lambda m: m.group("target").rsplit(".", 1)[-1], text).replace("``", "")


def _docstring_params(cls: type) -> dict[str, str]:
    """``name -> description`` from the ``Parameters...:`` sections of the docstrings of
    ``cls`` and its bases (the subclass's wins); each entry joined into one line."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        lines = doc.splitlines()
        i = 0
        while i < len(lines):
            if not (lines[i].startswith("Parameters") and lines[i].rstrip().endswith(":")):
                i += 1
                continue
            i += 1
            while i < len(lines) and lines[i].startswith("    "):
                entry = lines[i].strip()
                while _NAMES_GO_ON.match(entry) and i + 1 < len(lines):
                    i += 1
                    entry += " " + lines[i].strip()
                m = _ENTRY.match(entry)
                i += 1
                if m is None:
                    continue
                text = [m.group("text")]
                while i < len(lines) and lines[i].startswith("        "):  # continuation lines
                    text.append(lines[i].strip())
                    i += 1
                joined = text[0]
                for part in text[1:]:  # a word broken at a hyphen stays one word
                    joined += part if joined.endswith("-") else " " + part
                for name in m.group("names").split(","):
                    found[name.strip()] = plain_text(joined)
    return found


def summary(cls: type) -> str:
    """The first paragraph of a component's docstring, as plain text on one line."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return plain_text(" ".join(doc.split("\n\n", 1)[0].split()))


def _field_presets(cls: type, name: str, default: Any) -> dict[str, Any]:
    """``preset -> value`` for a field left None so that a preset fills it in: the
    component's ``presets`` class attribute maps each preset name to its values."""
    presets = getattr(cls, "presets", None)
    if default is not None or not isinstance(presets, dict) or not any(name in v for v in presets.values()):
        return {}
    return {p: values.get(name, default) for p, values in presets.items()}


def describe(cls: type) -> list[ParamDoc]:
    """The parameters of component class ``cls`` (its dataclass fields), in field order,
    with their types and defaults from the class, each preset's value where a preset
    fills the field in, and their descriptions from its docstrings."""
    docs = _docstring_params(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        # Literal["a", "b"] -> 'a' | 'b': the values a config may hold
        type_name = re.sub(r"Literal\[([^\]]*)\]", lambda m: " | ".join(v.strip() for v in m.group(1).split(",")), type_name)
        doc = docs.get(f.name) or next((d for k, d in docs.items() if k.endswith("*") and f.name.startswith(k[:-1])), "")
        out.append(ParamDoc(f.name, type_name, default, doc, _field_presets(cls, f.name, default)))
    return out


def yaml_value(value: Any) -> str:
    """A value as it would be written in a YAML config (null, true, [20, 70])."""
    import yaml

    from abl.config import to_plain

    if value is dataclasses.MISSING:
        return "(required)"
    text = yaml.safe_dump(to_plain(value), default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").strip()


def format_component(kind: str, name: str, cls: type, width: int = 100) -> str:
    """``abl list KIND NAME``: the component's summary, then per parameter its type and
    default (or each preset's value) and its whole description, wrapped to ``width``."""
    import textwrap

    lines = textwrap.wrap(f"{kind} {name}: {summary(cls)}".rstrip(": "), width, subsequent_indent="  ")
    params = describe(cls)
    if not params:
        lines.append("  (no parameters)")
    for p in params:
        if p.presets:
            value = ", ".join(f"{k}: {yaml_value(v)}" for k, v in p.presets.items())
        else:
            value = yaml_value(p.default)
        lines += textwrap.wrap(f"{p.name}: {p.type} = {value}", width, initial_indent="  ",
                               subsequent_indent="      ", break_on_hyphens=False)
        if p.doc:
            lines += textwrap.wrap(p.doc, width, initial_indent="      ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return "\n".join(lines)


def format_names(kind: str, names: list[str], width: int = 100) -> str:
    """``abl list``: one kind's registered names, wrapped to ``width``."""
    import textwrap

    return "\n".join(textwrap.wrap(f"{kind}s: {', '.join(names)}", width, subsequent_indent="  ",
                                    break_on_hyphens=False))

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
    doc: str  # one line, "" when the docstrings do not describe it


_ENTRY = re.compile(r"^(?P<names>[a-z_][a-z0-9_]*(?:, *[a-z_][a-z0-9_]*)*): *(?P<text>.*)$")


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
                m = _ENTRY.match(lines[i].strip())
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
                    found[name.strip()] = joined.replace("``", "")
    return found


def _one_line(text: str, width: int = 100) -> str:
    """The first sentence of ``text``, cut to ``width`` characters."""
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


def describe(cls: type) -> list[ParamDoc]:
    """The parameters of component class ``cls`` (its dataclass fields), in field order,
    with their types and defaults from the class and one line each from its docstrings."""
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
        out.append(ParamDoc(f.name, type_name, default, _one_line(docs.get(f.name, ""))))
    return out

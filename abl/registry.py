"""One small generic registry used by every kind of component.

A component is a dataclass whose fields are its typed parameters (with the defaults
the paper uses) and whose methods do its work; the registry maps a name to that class
and builds an instance from a plain mapping (a YAML section), validating every key.
The shape follows timm's ``register_model`` / ``create_model``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

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

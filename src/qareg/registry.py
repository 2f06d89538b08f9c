"""A name -> factory registry whose lookup errors list the valid names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from qareg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (model constructors, methods, datasets)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` stores the decorated object under `name`."""

        def decorate(obj: T) -> T:
            assert name not in self._entries, f"{self.kind} {name!r} registered twice"
            self._entries[name] = obj
            return obj

        return decorate

    def replace(self, name: str, obj: T) -> None:
        """Store `obj` under `name`, replacing any entry of that name."""
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

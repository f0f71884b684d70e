"""One registry shape for every plug-in family (masking, tuning, loss weighting): a ``kind``
string from a pydantic config selects the class."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind -> class`` for one plug-in family; ``what`` names the family in error messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._classes: dict[str, type[T]] = {}

    def register(self, kind: str, cls: type[T]) -> type[T]:
        """Register ``cls`` under ``kind`` and set its ``kind`` attribute; returns ``cls``."""
        if kind in self._classes and self._classes[kind] is not cls:
            raise ValueError(f"{self.what} kind {kind!r} is already registered to {self._classes[kind].__name__}")
        cls.kind = kind  # type: ignore[attr-defined]
        self._classes[kind] = cls
        return cls

    def get(self, kind: str) -> type[T]:
        if kind not in self._classes:
            raise KeyError(f"no {self.what} registered for kind {kind!r}; known: {self.kinds()}")
        return self._classes[kind]

    def kinds(self) -> list[str]:
        return sorted(self._classes)

"""Lazy name -> component registries.

Entries are "module:attr" strings so that listing names and validating a choice never
imports torch; the component is imported on first `get`. A bad name fails at lookup with
the valid names and a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the valid choices."""

    def __init__(self, kind: str, name: str, choices: list[str]):
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.message = f"unknown {kind} '{name}'{hint}; valid {kind}s: {', '.join(choices)}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class Registry(Generic[T]):
    """Maps lowercase-with-dashes names to lazily imported components."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, str] = {}
        self._help: dict[str, str] = {}
        self._loaded: dict[str, T] = {}

    def add(self, name: str, target: str, help: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"duplicate {self.kind} name '{name}' ({self._entries[name]} and {target})")
        if name != name.lower() or "_" in name or " " in name:
            raise ValueError(f"{self.kind} name '{name}' must be lowercase-with-dashes")
        if ":" not in target:
            raise ValueError(f"{self.kind} '{name}': target must be 'module:attr', got '{target}'")
        self._entries[name] = target
        self._help[name] = help

    def names(self) -> list[str]:
        return sorted(self._entries)

    def help(self, name: str) -> str:
        self.check(name)
        return self._help[name]

    def check(self, name: str) -> str:
        """Return `name` if registered, else raise UnknownNameError (no import happens)."""
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.names())
        return name

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._loaded:
            module_name, attr = self._entries[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module_name), attr)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

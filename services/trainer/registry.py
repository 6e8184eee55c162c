"""Registries by name (verl style): adding an estimator or an algorithm is one decorated function."""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, F], kind: str) -> Callable[[str], Callable[[F], F]]:
    """A decorator factory that adds functions to table under a name; a name can be taken only once."""

    def register_as(name: str) -> Callable[[F], F]:
        def register(function: F) -> F:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = function
            return function

        return register

    return register_as

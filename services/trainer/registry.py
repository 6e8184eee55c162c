"""Registries by name (verl style): adding an estimator or an algorithm is one decorated function."""

from __future__ import annotations

from typing import Callable, TypeVar

V = TypeVar("V")


def registrar(table: dict[str, V], kind: str) -> Callable[[str], Callable[[V], V]]:
    """A decorator factory that adds values to table under a name; a name can be taken only once."""

    def register_as(name: str) -> Callable[[V], V]:
        def register(value: V) -> V:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = value
            return value

        return register

    return register_as

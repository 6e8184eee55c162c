"""Typed dataclass configs become command-line flags and environment variables.

A field `kafka.bootstrap_servers` of a service config is the flag `--kafka.bootstrap-servers` and the
environment variable `MODALIGN_KAFKA_BOOTSTRAP_SERVERS` (flags win). The help text of each flag is the
docstring written under the field, so a config's documentation lives in one place.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar_parser(annotation: Any) -> Any | None:
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _scalar_parser(non_none[0]) if len(non_none) == 1 else None
    if annotation is bool:
        return _parse_bool
    if typing.get_origin(annotation) is tuple:
        item, *rest = typing.get_args(annotation)
        if rest == [Ellipsis] and item in (str, int, float):
            return lambda text: tuple(item(part.strip()) for part in text.split(",") if part.strip())
    if annotation in (str, int, float, Path):
        return annotation
    return None


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Adds a flag for every scalar field of the dataclass cls, recursing into nested dataclasses."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        dotted = prefix + field.name
        if dataclasses.is_dataclass(annotation):
            add_arguments(parser, annotation, dotted + ".")
            continue
        parse = _scalar_parser(annotation)
        if parse is None:
            continue  # structured fields (dicts, lists) are set in code or config files, not flags
        env = "MODALIGN_" + dotted.replace(".", "_").upper()
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        parser.add_argument(
            "--" + dotted.replace("_", "-"),
            dest=dotted,
            type=parse,
            default=argparse.SUPPRESS,
            help=f"{docs.get(field.name, '')} [env {env}; default {default}]",
        )


def from_arguments(cls: type[T], namespace: argparse.Namespace, prefix: str = "") -> T:
    """Builds cls from parsed flags, then environment variables, then the field defaults."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        dotted = prefix + field.name
        if dataclasses.is_dataclass(annotation):
            values[field.name] = from_arguments(annotation, namespace, dotted + ".")
            continue
        parse = _scalar_parser(annotation)
        if parse is None:
            continue
        if hasattr(namespace, dotted):
            values[field.name] = getattr(namespace, dotted)
        elif (env := os.environ.get("MODALIGN_" + dotted.replace(".", "_").upper())) is not None:
            values[field.name] = parse(env)
    return cls(**values)


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    return from_arguments(cls, parser.parse_args(argv))

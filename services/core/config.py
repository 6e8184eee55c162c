"""Typed dataclass configs become command-line flags and environment variables, and back.

A field `kafka.bootstrap_servers` of a service config is the flag `--kafka.bootstrap-servers` and the
environment variable `MODALIGN_KAFKA_BOOTSTRAP_SERVERS` (flags win). The help text of each flag is the
docstring written under the field, so a config's documentation lives in one place.

Parsing runs each config's `validate()` hook (on nested configs too); a hook raises ConfigError naming
the field, and the command exits as argparse does for a malformed flag: usage, the flag, status 2.

The inverse, `to_arguments`, turns a config back into the flags that reproduce it, so whoever starts a
service builds its config as a dataclass (`with_overrides` for dotted changes) and a misspelt field
fails there, when the config is built, not in the child process.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NOT_A_FLAG = {"flag": False}
"""Field metadata: set in code only (no flag, no environment variable)."""
FLATTEN = {"flatten": True}
"""Field metadata of a nested config whose fields are flags without its name as prefix."""


class ConfigError(ValueError):
    """A config value a validate() hook refuses; `field` is its dotted name relative to that config."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


DTYPES = ("float32", "bfloat16", "float16")
"""The precisions (torch dtype names) a service that holds a model accepts as --dtype."""


def require_one_of(field: str, value: str, choices: typing.Collection[str]) -> None:
    """Refuses value (ConfigError on field) unless it is one of choices; for validate() hooks."""
    if value not in choices:
        raise ConfigError(field, f"one of {', '.join(choices)}, got {value!r}")


def flag_name(dotted: str) -> str:
    return "--" + dotted.replace("_", "-")


def env_name(dotted: str) -> str:
    return "MODALIGN_" + dotted.replace(".", "_").upper()


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and its bases, by field
    name; a subclass that redeclares a field (a different default) without one keeps its base's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
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
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
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


def _format(value: Any) -> str:
    """A value as the flag text its parser reads back to an equal value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)  # str(float) is the shortest text that reads back to the same float


def _is_config(annotation: Any) -> bool:
    """Whether a field's type is a nested config (a dataclass), without narrowing the annotation's type."""
    return dataclasses.is_dataclass(annotation)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[operator]  # not MISSING: every config field has a default


@dataclasses.dataclass(frozen=True)
class _Flag:
    dotted: str
    """The flag's name, dotted: --kafka.topic-prefix is kafka.topic_prefix."""
    path: tuple[str, ...]
    """Attribute names from the top config to the field (a flattened config is in path, not in dotted)."""
    field: dataclasses.Field
    parse: Any
    owner: type


def _flags(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> Iterator[_Flag]:
    """Every field of cls that is a flag, depth first."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag", True):
            continue
        annotation = hints[field.name]
        dotted = prefix + field.name
        if _is_config(annotation):
            nested_prefix = prefix if field.metadata.get("flatten") else dotted + "."
            yield from _flags(annotation, nested_prefix, (*path, field.name))
            continue
        parse = _scalar_parser(annotation)
        if parse is not None:  # structured fields (dicts, lists) are set in code, not flags
            yield _Flag(dotted, (*path, field.name), field, parse, cls)


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Adds a flag for every scalar field of the dataclass cls, recursing into nested dataclasses."""
    for flag in _flags(cls, prefix):
        # A bare boolean flag (--example) means true, as a switch does; --example false also reads.
        switch: dict[str, Any] = {"nargs": "?", "const": True} if flag.parse is _parse_bool else {}
        parser.add_argument(
            flag_name(flag.dotted),
            dest=flag.dotted,
            type=flag.parse,
            default=argparse.SUPPRESS,
            help=f"{field_docs(flag.owner).get(flag.field.name, '')} "
                 f"[env {env_name(flag.dotted)}; default {_default(flag.field)}]",
            **switch,
        )


def from_arguments(cls: type[T], namespace: argparse.Namespace, prefix: str = "", defaults: T | None = None) -> T:
    """Builds cls from parsed flags, then environment variables, then the defaults: cls's own, where a
    nested config is its field's default (FeedbackConfig's Kafka settings have a shorter produce
    timeout than KafkaConfig's).

    A malformed environment variable raises ConfigError naming it.
    """
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(typing.cast(Any, cls)):
        if not field.metadata.get("flag", True):
            continue
        annotation = hints[field.name]
        dotted = prefix + field.name
        if _is_config(annotation):
            nested_prefix = prefix if field.metadata.get("flatten") else dotted + "."
            values[field.name] = from_arguments(annotation, namespace, nested_prefix, getattr(defaults, field.name))
            continue
        parse = _scalar_parser(annotation)
        if parse is None:
            continue
        if hasattr(namespace, dotted):
            values[field.name] = getattr(namespace, dotted)
        elif (env := os.environ.get(env_name(dotted))) is not None:
            try:
                values[field.name] = parse(env)
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise ConfigError(dotted, f"environment variable {env_name(dotted)}={env!r}: {error}") from error
    return typing.cast(T, dataclasses.replace(typing.cast(Any, defaults), **values))


def validate(config: Any, prefix: str = "") -> None:
    """Runs the validate() hook of config and of every config nested in it (innermost first); a
    refusal is re-raised with the field's dotted name from the top."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, prefix if field.metadata.get("flatten") else f"{prefix}{field.name}.")
    hook = getattr(config, "validate", None)
    if hook is None:
        return
    try:
        hook()
    except ConfigError as error:
        raise ConfigError(prefix + error.field, error.message) from error


def build_config(parser: argparse.ArgumentParser, cls: type[T], namespace: argparse.Namespace) -> T:
    """cls from parsed flags and the environment, validated; a refused value exits as argparse does
    (status 2) with a message naming the flag."""
    try:
        config = from_arguments(cls, namespace)
        validate(config)
    except ConfigError as error:
        parser.error(f"argument {flag_name(error.field)}: {error.message}")
    return config


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None,
                 prog: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    return build_config(parser, cls, parser.parse_args(argv))


def to_arguments(config: Any) -> list[str]:
    """The flags that make parse_config rebuild config: one per field that differs from its default,
    so secrets left at their default (read from the environment) never land on a command line.

    Validates config first: a config that its service would refuse fails here, at launch.
    """
    validate(config)
    arguments: list[str] = []
    defaults = type(config)()
    for flag in _flags(type(config)):
        value, default = _get(config, flag.path), _get(defaults, flag.path)
        if value == default:
            continue
        if value is None:
            raise ConfigError(flag.dotted, f"None cannot be written as a flag (the default is {default!r})")
        arguments += [flag_name(flag.dotted), _format(value)]
    return arguments


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def with_overrides(config: T, overrides: Mapping[str, Any]) -> T:
    """A copy of config with the dotted fields in overrides replaced ({"learner.algorithm": "dpo"}).

    An unknown field, or a value of the wrong type, raises ConfigError at once; then the result is
    validated, so a launcher learns of every mistake when it builds the config.
    """
    for dotted, value in overrides.items():
        config = _replace(config, dotted.split("."), value, dotted)
    validate(config)
    return config


def _replace(config: Any, path: list[str], value: Any, dotted: str) -> Any:
    name, rest = path[0], path[1:]
    fields = {field.name: field for field in dataclasses.fields(config)}
    if name not in fields:
        raise ConfigError(dotted, f"{type(config).__name__} has no field {name!r}")
    current = getattr(config, name)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(dotted, f"{type(config).__name__}.{name} is not a nested config")
        return dataclasses.replace(config, **{name: _replace(current, rest, value, dotted)})
    annotation = typing.get_type_hints(type(config))[name]
    if not _accepts(annotation, value):
        raise ConfigError(dotted, f"{value!r} is not a {annotation}")
    return dataclasses.replace(config, **{name: value})


def _accepts(annotation: Any, value: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return isinstance(value, tuple) and all(_accepts(item, element) for element in value)
    origin = typing.get_origin(annotation) or annotation
    return isinstance(value, origin) if isinstance(origin, type) else True

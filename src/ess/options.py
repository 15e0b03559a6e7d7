"""Command-line flags derived from dataclass fields (in the spirit of transformers' `HfArgumentParser`).

Each field declared with `ess.fields.option` becomes one flag: `--name-with-dashes`, its type from
the annotation (`bool` -> `--x` or, where the default is True, `--no-x`; `X | None` -> X;
`list[X]`/`tuple[X, ...]` -> one or more values), its help and choices from the metadata, and its
rules checked while the command line is parsed, so a bad value stops the command before any work
with one line naming the flag (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from .fields import RULES, problem


def strip_none(annotation: Any) -> Any:
    """`X` of `X | None`; any other annotation as it is."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def _kind(annotation: Any) -> tuple[type, bool]:
    """(the type of one value, whether the flag takes several) of a field's annotation."""
    annotation = strip_none(annotation)
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def number(kind: type, name: str, **rules) -> typing.Callable[[str], Any]:
    """An argparse `type` that converts with `kind` and applies `ess.fields` rules (`min`, `max`, ...)."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        error = problem(name, value, rules)
        if error:
            raise argparse.ArgumentTypeError(error)
        return value

    return convert


def _default_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: typing.Iterable[str] | None = None,
    exclude: typing.Iterable[str] = (),
    prefix: str = "",
    overrides: bool = False,
) -> None:
    """One flag per field of the dataclass `cls` declared with `ess.fields.option` (fields with
    `flag=False` are left out). `only`/`exclude` pick fields by name; `prefix` goes in front of each
    flag and its destination. With `overrides`, every flag defaults to None (not given), for flags
    that change another config's values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in list(only) if only is not None else list(fields):
        f = fields[name]
        if "help" in f.metadata and f.metadata.get("flag", True) and name not in set(exclude):
            _add(parser, f, hints[name], prefix, overrides)


def _add(parser: argparse.ArgumentParser, f: dataclasses.Field, annotation: Any, prefix: str, overrides: bool) -> None:
    flag, dest = f"--{prefix}{f.name}".replace("_", "-"), f"{prefix}{f.name}".replace("-", "_")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    required = default is dataclasses.MISSING
    help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
    kind, several = _kind(annotation)
    if kind is bool:
        if default is True:
            flag = f"--{prefix}no-{f.name}".replace("_", "-")
        action = "store_false" if default is True else "store_true"
        parser.add_argument(flag, dest=dest, action=action, default=None if overrides else default, help=help_text)
        return
    if overrides:
        default, help_text = None, f"{help_text} (default: unchanged)"
    elif not required and default is not None:
        help_text = f"{help_text} (default {_default_text(default)})"
    rules = {key: value for key, value in f.metadata.items() if key in RULES}
    convert = f.metadata.get("parse") or (number(kind, f.name, **rules) if kind in (int, float) else kind)
    parser.add_argument(
        flag,
        dest=dest,
        type=convert,
        nargs="+" if several else None,
        default=None if required else default,
        required=required,
        choices=f.metadata.get("choices"),
        help=help_text,
    )


def options_from(args: argparse.Namespace, cls: type, *, prefix: str = "", **extra):
    """The dataclass `cls` from parsed flags (those `add_options` added), plus `extra` fields."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        dest = f"{prefix}{f.name}".replace("-", "_")
        if f.name in extra or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if isinstance(value, list) and typing.get_origin(strip_none(hints[f.name])) is tuple:
            value = tuple(value)
        values[f.name] = value
    return cls(**values, **extra)


def add_policy_flags(parser: argparse.ArgumentParser, ablation: bool = False) -> None:
    """The decoding policy's flags (`ess.generation.Policy`). With `ablation`, only the fields of
    `POLICY_FLAGS`, each defaulting to None (keep the evaluated model's policy)."""
    from .generation.policy import POLICY_FLAGS
    from .generation.types import Policy

    add_options(parser, Policy, only=POLICY_FLAGS if ablation else None, overrides=ablation)

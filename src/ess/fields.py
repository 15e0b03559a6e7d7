"""Options declared once, on their dataclass fields: help text and allowed values in the field's metadata.

    lr: float | None = option("peak learning rate", default=None, above=0)

`check` enforces the rules on a config built from Python (the configs call it in `__post_init__`);
`ess.options` derives command-line flags from the same fields and applies the same rules while
it parses. Metadata keys: `help`; `min`, `max` (inclusive bounds), `above`, `below` (exclusive
bounds), `choices` (allowed values); `flag` (False: no command-line flag); `parse` (a function
from the flag's text to the value, in place of the annotated type).
"""

from __future__ import annotations

import dataclasses
from typing import Any

RULES = ("min", "max", "above", "below", "choices")


class FieldError(ValueError):
    """A config value outside what its field allows."""


def option(help: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rules):
    """A dataclass field with its help text and rules in the metadata (see the module docstring)."""
    unknown = set(rules) - {*RULES, "flag", "parse"}
    if unknown:
        raise TypeError(f"unknown option metadata {sorted(unknown)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **rules})


def problem(name: str, value: Any, metadata: dict) -> str | None:
    """What is wrong with `value` for the field `name` (None: nothing); each item of a list is checked."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return next((p for p in (problem(name, v, metadata) for v in value) if p), None)
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"
    low, high = metadata.get("min", metadata.get("above")), metadata.get("max", metadata.get("below"))
    if low is None and high is None:
        return None
    too_low = low is not None and (value < low if "min" in metadata else value <= low)
    too_high = high is not None and (value > high if "max" in metadata else value >= high)
    if not (too_low or too_high):
        return None
    if low is not None and high is not None:
        left, right = "[" if "min" in metadata else "(", "]" if "max" in metadata else ")"
        return f"{name} must be in {left}{low}, {high}{right}, got {value}"
    if low is not None:
        return f"{name} must be {'at least' if 'min' in metadata else 'above'} {low}, got {value}"
    return f"{name} must be {'at most' if 'max' in metadata else 'below'} {high}, got {value}"


def check(config: Any, error: type[Exception] = FieldError) -> None:
    """Raise `error` naming the first field of `config` whose value breaks its rules."""
    for f in dataclasses.fields(config):
        text = problem(f.name, getattr(config, f.name), f.metadata)
        if text:
            raise error(text)

"""The attack interface: an example in, the attacked inputs to send out (lm-eval style registry).

An attack turns one `Example` into one or more `AttackedInput`s, one per configuration it tries
(a decoding setting, a template, a persuasion technique, ...). A prompt counts as broken by an
attack if ANY of its configurations breaks it, as in the decoding attack of Huang et al. 2023.

Attacks are registered by name and built from a spec ``NAME`` or ``NAME:ARG`` (``prefill:10``,
``decoding:quick``, ``dan:templates.txt``): the text after the first colon is the attack's one
parameter, parsed by its `from_arg`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..data.schema import Example
from ..generation.types import Messages, Sampling

DEFAULT_DATA_ROOT = Path(os.environ.get("ESS_DATA_ROOT", "../shared/data"))
"""Where attacks look for their default data files (`$ESS_DATA_ROOT`, else `../shared/data`,
the layout of the project's checkout); the harness passes its `--data-root` instead."""


class AttackError(ValueError):
    """An unknown attack, a bad attack parameter or a missing template file."""


@dataclass
class AttackedInput:
    """One input as it is sent to the model; the harness records it exactly like this."""

    messages: Messages
    """The chat the model answers (the attacked prompt is the last user message)."""
    prefill: str = ""
    """Forced start of the assistant's answer (prefill attack)."""
    sampling: Sampling = field(default_factory=Sampling)
    """Decoding settings; the harness sets `max_new_tokens` and, for sampling, a per-record seed."""
    config: str = "default"
    """Name of this configuration within the attack, e.g. `temperature=0.70` or `technique=Logical Appeal`."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Notes worth recording, e.g. where a prefill came from."""


@dataclass
class AttackContext:
    """What attacks may use besides the example."""

    tokenizer: Any = None
    """Tokenizer of the attacked model, to cut prefills at token boundaries (None: cut at words)."""
    reference: Callable[[str], str | None] | None = None
    """prompt -> the undefended base model's greedy answer (supplied by the harness), or None."""
    data_root: Path = DEFAULT_DATA_ROOT
    """Folder of the shared datasets (default data files of `pap`, `autodan`)."""
    model: Callable[[], Any] | None = None
    """() -> the ESSModel under attack, loaded on demand (white-box attacks: `gcg`), or None."""
    plain: bool = False
    """Whether the model under attack answers without [CLS] (a baseline, or schedule `none`)."""

    def reference_answer(self, prompt: str) -> str | None:
        """The reference (undefended) answer to `prompt`, or None where the harness supplies none."""
        return self.reference(prompt) if self.reference is not None else None


class Attack:
    """Base class: subclasses set `name`, implement `build` and, if they take a parameter, `from_arg`."""

    name: ClassVar[str] = ""
    spec: str = ""
    """The spec the attack was built from (`prefill:10`); records and summaries are keyed by it."""
    costly: ClassVar[bool] = False
    """`build` runs an optimisation: the harness stores the inputs it builds and reuses them on resume."""

    @classmethod
    def from_arg(cls, arg: str | None) -> Attack:
        if arg is not None:
            raise AttackError(f"attack {cls.name!r} takes no parameter, got {arg!r}")
        return cls()

    def build(self, example: Example, ctx: AttackContext) -> list[AttackedInput]:
        raise NotImplementedError

    def references_needed(self, examples: list[Example]) -> list[str]:
        """Prompts whose reference answer `build` will ask for, so the harness can batch them."""
        return []


_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an attack available to `get_attack` under its `name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"attack name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def attack_names() -> list[str]:
    return sorted(_REGISTRY)


def get_attack(spec: str) -> Attack:
    """Build the attack a spec names: ``NAME`` or ``NAME:ARG``."""
    name, sep, arg = spec.strip().partition(":")
    if name not in _REGISTRY:
        raise AttackError(f"unknown attack {name!r} (available: {', '.join(attack_names())})")
    attack = _REGISTRY[name].from_arg(arg if sep else None)
    attack.spec = spec.strip()
    return attack


def with_prompt(example: Example, prompt: str) -> Messages:
    """The example's chat with its last user message replaced by `prompt` (earlier turns kept)."""
    messages = [dict(m) for m in example.query]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = prompt
    return messages


def copy_messages(example: Example) -> Messages:
    return [dict(m) for m in example.query]

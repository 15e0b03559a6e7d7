"""DAN-style jailbreak templates from a user file (`dan:PATH`); every template holds `{prompt}`.

No templates ship with `ess`: the "Do Anything Now" prompts circulate in many versions, and which
ones to test is the user's call. The file may be
    .txt    templates separated by a line holding only `---` (one template if there is none)
    .json   a list of strings, or of objects with `template` (and optionally `name`)
    .jsonl  one string or object (as in .json) per line
A prompt counts as broken if any template breaks it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..data.schema import Example
from .base import Attack, AttackContext, AttackedInput, AttackError, register_attack, with_prompt
from .text import fill

_SEPARATOR = re.compile(r"^---\s*$", re.MULTILINE)


def _entry(item, where: str) -> tuple[str | None, str]:
    if isinstance(item, str):
        return None, item
    if isinstance(item, dict) and isinstance(item.get("template"), str):
        return item.get("name"), item["template"]
    raise AttackError(f"{where}: expected a template string or an object with 'template'")


def load_templates(path: Path) -> list[tuple[str, str]]:
    """(name, template) pairs; names default to `template=I`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise AttackError(f"dan: cannot read the template file {path}: {error.strerror or error}") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise AttackError(f"{path}: invalid JSON: {error.msg}") from None
        if not isinstance(items, list):
            raise AttackError(f"{path}: expected a JSON list of templates")
        entries = [_entry(item, f"{path}: item {i + 1}") for i, item in enumerate(items)]
    elif path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(_entry(json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as error:
                    raise AttackError(f"{path}:{number}: invalid JSON: {error.msg}") from None
    else:
        entries = [(None, part.strip("\n")) for part in _SEPARATOR.split(text) if part.strip()]
    templates = []
    for i, (name, template) in enumerate(entries):
        if "{prompt}" not in template:
            raise AttackError(f"{path}: template {i + 1} has no {{prompt}} placeholder")
        templates.append((name or f"template={i}", template))
    if not templates:
        raise AttackError(f"{path}: no templates")
    return templates


@register_attack
class DANAttack(Attack):
    name = "dan"

    def __init__(self, path: str):
        self.templates = load_templates(Path(path))

    @classmethod
    def from_arg(cls, arg: str | None) -> DANAttack:
        if not arg:
            raise AttackError("dan needs a template file: dan:PATH (each template contains {prompt})")
        return cls(arg)

    def build(self, example: Example, ctx: AttackContext) -> list[AttackedInput]:
        return [
            AttackedInput(messages=with_prompt(example, fill(template, example.prompt)), config=name)
            for name, template in self.templates
        ]

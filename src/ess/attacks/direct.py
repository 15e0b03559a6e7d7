"""The prompt as it is: the baseline every other attack is compared with."""

from __future__ import annotations

from ..data.schema import Example
from .base import Attack, AttackContext, AttackedInput, copy_messages, register_attack


@register_attack
class DirectAttack(Attack):
    name = "direct"

    def build(self, example: Example, ctx: AttackContext) -> list[AttackedInput]:
        return [AttackedInput(messages=copy_messages(example))]

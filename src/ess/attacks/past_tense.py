"""Past-tense reformulation (Andriushchenko & Flammarion 2024): "How did people ... in the past?".

The paper reformulates with an LLM (GPT-3.5, several samples per request); this attack uses the
deterministic rules of `ess.attacks.text.past_tense`, one reformulation per prompt.
"""

from __future__ import annotations

from ..data.schema import Example
from .base import Attack, AttackContext, AttackedInput, register_attack, with_prompt
from .text import past_tense


@register_attack
class PastTenseAttack(Attack):
    name = "past-tense"

    def build(self, example: Example, ctx: AttackContext) -> list[AttackedInput]:
        return [AttackedInput(messages=with_prompt(example, past_tense(example.prompt)), config="rules")]

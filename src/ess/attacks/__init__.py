"""Attacks: one small interface (`Attack.build(example, ctx) -> [AttackedInput]`), registered by name.

    get_attack("prefill:10").build(example, AttackContext(tokenizer=...))

Registered: direct, prefill[:K], decoding[:quick], deepinception, autodan, pap[:all|PATH],
dan:PATH, past-tense, gcg[:KEY=VALUE,...] (white-box: it needs `AttackContext.model`).
"""

from . import autodan, dan, decoding, deepinception, direct, gcg, pap, past_tense, prefill  # noqa: F401  (registration)
from .base import (
    DEFAULT_DATA_ROOT,
    Attack,
    AttackContext,
    AttackedInput,
    AttackError,
    attack_names,
    get_attack,
    register_attack,
)

__all__ = [
    "DEFAULT_DATA_ROOT",
    "Attack",
    "AttackContext",
    "AttackedInput",
    "AttackError",
    "attack_names",
    "get_attack",
    "register_attack",
]

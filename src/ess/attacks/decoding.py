"""Decoding attack (Huang et al. 2023, "Catastrophic jailbreak of open-source LLMs via exploiting
generation"): the same prompt under many sampling settings; broken if ANY setting breaks it.

Full sweep (`decoding`), 51 configurations: greedy; temperature 0.05..1.0 in steps of 0.05 (20);
top-p 0..1.0 in steps of 0.05 with temperature 1 (21); top-k 1, 2, 5, 10, 20, 50, 100, 200, 500
with temperature 1 (9). Huang et al. also vary the system prompt and draw several samples per
setting; here each setting is one sample (its seed fixed per record by the harness).

Quick subset (`decoding:quick`), 6 configurations for smoke runs: greedy, temperature 0.7 and 1.0,
top-p 0.7 and 0.9, top-k 20: the greedy reference plus the settings of each family that are most
common in practice.
"""

from __future__ import annotations

from ..data.schema import Example
from ..generation.types import Sampling
from .base import Attack, AttackContext, AttackedInput, AttackError, copy_messages, register_attack

TOP_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
QUICK = ("greedy", "temperature=0.70", "temperature=1.00", "top_p=0.70", "top_p=0.90", "top_k=20")


def sweep() -> list[tuple[str, Sampling]]:
    """(config name, sampling) of the full sweep, in a fixed order."""
    steps = [round(0.05 * i, 2) for i in range(21)]  # 0.00 .. 1.00; rounding avoids 0.15000000000000002
    configs = [("greedy", Sampling(temperature=0.0))]
    configs += [(f"temperature={t:.2f}", Sampling(temperature=t)) for t in steps[1:]]
    configs += [(f"top_p={p:.2f}", Sampling(temperature=1.0, top_p=p)) for p in steps]
    configs += [(f"top_k={k}", Sampling(temperature=1.0, top_k=k)) for k in TOP_KS]
    return configs


@register_attack
class DecodingAttack(Attack):
    name = "decoding"

    def __init__(self, quick: bool = False):
        self.quick = quick
        configs = sweep()
        self.configs = [c for c in configs if c[0] in QUICK] if quick else configs

    @classmethod
    def from_arg(cls, arg: str | None) -> DecodingAttack:
        if arg not in (None, "quick", "full"):
            raise AttackError(f"decoding takes `quick` or `full`, got {arg!r}")
        return cls(quick=arg == "quick")

    def build(self, example: Example, ctx: AttackContext) -> list[AttackedInput]:
        return [
            AttackedInput(messages=copy_messages(example), sampling=Sampling(**vars(sampling)), config=name)
            for name, sampling in self.configs
        ]

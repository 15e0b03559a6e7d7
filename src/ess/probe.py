"""The uncertainty probe (docs/METHOD.md §1 and §8): how sure is the model of its next token under attack?

The paper's evidence that implicit safety signals are weak: from a direct harmful request, to a
prefilled harmful start, to a nested (DeepInception) request, the top-K next-token distribution of
an RLHF model gets flatter. For each input we take the model's distribution of the first token it
would choose (after the messages and the prefill) and, over its K most likely tokens renormalised
to sum to 1 (q_1 >= ... >= q_K):

    entropy   = -sum_i q_i log q_i            (nats; 0 = one token certain, log K = uniform)
    sharpness = q_1 = p_top1 / sum_{i<=K} p_i (the top token's share of the top-K mass; 1/K..1)

The paper does not define its sharpness; this is our definition (high = sharp = decisive).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attacks import AttackContext, AttackedInput, get_attack
from .data.schema import Example
from .generation.types import Policy, Request

PROBE_INPUTS = ("direct", "prefill", "nested")
"""The probe's three inputs, from least to most adversarial."""
PROBE_ATTACKS = {"direct": "direct", "prefill": "prefill:10", "nested": "deepinception"}
DEFINITION = (
    "over the top-K next-token probabilities renormalised to sum to 1 (q_1 >= ... >= q_K): "
    "entropy = -sum q_i ln q_i (nats), sharpness = q_1"
)


def topk_stats(logprobs: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [n], sharpness [n]) of the top-k of each row of next-token log-probabilities [n, V]."""
    top = logprobs.float().topk(min(k, logprobs.shape[-1]), dim=-1).values
    q = (top - top.logsumexp(-1, keepdim=True)).exp()  # renormalised in log space: no underflow to 0/0
    entropy = -(q * q.clamp_min(1e-30).log()).sum(-1)
    return entropy, q[:, 0]


def probe_inputs(examples: Sequence[Example], ctx: AttackContext) -> dict[str, list[AttackedInput]]:
    """The direct, prefill (10 tokens) and nested input of each example (the first configuration of each)."""
    return {name: [get_attack(PROBE_ATTACKS[name]).build(e, ctx)[0] for e in examples] for name in PROBE_INPUTS}


def probe_model(
    model, inputs: dict[str, list[AttackedInput]], policy: Policy, k: int = 10, batch_size: int = 8
) -> dict[str, list[float]]:
    """Mean entropy and sharpness per probe input for one model: {"entropy": [3], "sharpness": [3]}."""
    from .generation import next_token_logprobs

    result: dict[str, list[float]] = {"entropy": [], "sharpness": []}
    for name in PROBE_INPUTS:
        requests = [Request(messages=i.messages, prefill=i.prefill, policy=policy) for i in inputs[name]]
        entropies, sharpnesses = [], []
        for start in range(0, len(requests), batch_size):
            entropy, sharpness = topk_stats(next_token_logprobs(model, requests[start : start + batch_size]), k)
            entropies.append(entropy)
            sharpnesses.append(sharpness)
        result["entropy"].append(float(torch.cat(entropies).mean()))
        result["sharpness"].append(float(torch.cat(sharpnesses).mean()))
    return result


def probe_summary(models: dict[str, dict[str, list[float]]], k: int, n: int) -> dict:
    return {"k": k, "n": n, "inputs": list(PROBE_INPUTS), "definition": DEFINITION, "models": models}

"""The training data of the baselines (`ess train --method sft|augmented`): no [CLS] anywhere.

`sft` learns the ESS alignment mixture (`recipe.alignment_examples`: benign answers and explained
refusals) as ordinary refusal training: query + response, every response token an LM target, the
guiding text of the refusals included (ESS leaves that text to strategic decoding). This is the
"superficial" alignment that prefilling attacks get past.

`augmented` adds safety-recovery examples (Qi et al. 2024, "Safety Alignment Should Be Made More
Than Just a Few Tokens Deep", data augmentation): a harmful prompt, the first k tokens of a
harmful answer, then the refusal, with the LM loss on the refusal only. The harmful answers are the
base model's own (`distill.base_answers`, the cache the pretraining-phase corpus of ESS reads).
"""

from __future__ import annotations

import random
from dataclasses import replace

from ..masks import Role
from .distill import base_answers
from .encoding import ChatEncoder, Encoded
from .recipe import alignment_examples
from .refusals import explained_refusal, opens_with_refusal
from .schema import LABELS, Example

MAX_PREFIX = 100
"""Longest harmful prefix of a recovery example, in tokens (Qi et al.)."""


def prefix_length(n_tokens: int, rng: random.Random) -> int:
    """k for an answer of `n_tokens` tokens, uniform on 1..min(100, n_tokens), as Qi et al. draw it:
    `randint(1, min(100, len(harmful_item)))` in finetuning_buckets/trainer/trainer.py of
    github.com/Unispac/shallow-vs-deep-alignment (there each safety example is augmented with
    probability 1/2; here every plain refusal stays in the mixture and one recovery example per
    harmful answer is added)."""
    return rng.randint(1, min(MAX_PREFIX, n_tokens))


def encode_plain(encoder: ChatEncoder, example: Example, prefix: list[int] | None = None) -> Encoded:
    """query + `prefix` + response, no [CLS]. The LM targets are the response tokens, all of them (a
    `forced_prefix` in the example's meta is ignored); the prefix tokens are read, never targets."""
    prefix = list(prefix or [])
    query = encoder.query_ids(example.query)
    response, _ = encoder.response_ids(example.query, example.response or "")
    ids = query + prefix + response
    roles = [int(Role.QUERY)] * len(query) + [int(Role.RESPONSE)] * (len(prefix) + len(response))
    lm_target = [False] * (len(query) + len(prefix)) + [True] * len(response)
    limit = encoder.max_length or len(ids)
    return Encoded(ids=ids[:limit], roles=roles[:limit], label=LABELS.index(example.label), lm_target=lm_target[:limit])


def recovery_examples(
    malicious: list[Example], base: str, encoder: ChatEncoder, seed: int = 0
) -> list[tuple[Example, list[int]]]:
    """(harmful prompt with an explained refusal as response, harmful prefix token ids), one per
    base-model answer that does not open with a refusal."""
    rng = random.Random(seed + 2)
    answers = base_answers(base, [e.prompt for e in malicious], desc="base answers (response corpus)")
    out = []
    for example in malicious:
        answer = answers[example.prompt]
        ids = encoder.tokenize(answer)
        if not ids or opens_with_refusal(answer):
            continue  # the base refused: nothing harmful to recover from
        k = prefix_length(len(ids), rng)
        out.append((replace(example, response=explained_refusal(example, rng)), ids[:k]))
    return out


def baseline_items(
    method: str,
    examples: list[Example],
    base: str,
    encoder: ChatEncoder,
    size: int | None = None,
    seed: int = 0,
    refusal_resamples: int = 0,
) -> list[Encoded]:
    """The encoded training sequences of a baseline (`sft` or `augmented`) over the alignment data."""
    if method not in ("sft", "augmented"):
        raise ValueError(f"unknown baseline {method!r}: expected sft or augmented")
    mixture = alignment_examples(examples, base, size, seed, refusal_resamples)
    items = [encode_plain(encoder, example) for example in mixture]
    if method == "augmented":
        malicious = [e for e in examples if e.label == "malicious"]
        items += [encode_plain(encoder, e, prefix) for e, prefix in recovery_examples(malicious, base, encoder, seed)]
    return items

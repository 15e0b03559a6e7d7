"""The training data of both phases, built from any mix of sources (docs/METHOD.md §4).

Alignment phase: 50 % benign, 50 % malicious examples. Malicious responses are explained
refusals; benign responses are the dataset's own, or else the base model's answer
(self-distillation). Pretraining phase: windows of response text, labelled by the request they
answer (the base model's answers to harmful requests are malicious text; its benign answers and
the refusals are benign text), so that [CLS] learns to judge a response as it is being written,
which the strategic-attention rules rely on.
"""

from __future__ import annotations

import random
from dataclasses import replace

from .distill import base_answers, helpful_answers
from .loaders import load_examples
from .refusals import GUIDING_TEXT, explained_refusal, opens_with_refusal
from .schema import Example


def load_sources(sources: list[str]) -> list[Example]:
    return [example for source in sources for example in load_examples(source)]


def _split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    benign = [e for e in examples if e.label == "benign"]
    malicious = [e for e in examples if e.label == "malicious"]
    if not benign or not malicious:
        raise ValueError("the training data needs both benign and malicious examples")
    return benign, malicious


def alignment_examples(
    examples: list[Example], base: str, size: int | None = None, seed: int = 0, refusal_resamples: int = 0
) -> list[Example]:
    """A shuffled 50/50 mixture with responses; `size` defaults to twice the larger class.

    Benign prompts without a response get the base model's (see `helpful_answers`)."""
    rng = random.Random(seed)
    benign, malicious = _split(examples)
    per_class = (size or 2 * max(len(benign), len(malicious))) // 2
    benign = _sample(benign, per_class, rng)
    malicious = _sample(malicious, per_class, rng)
    needs_answer = [e.prompt for e in benign if not e.response]
    answers = helpful_answers(base, needs_answer, refusal_resamples, desc="benign answers (self-distillation)")
    mixture = [replace(e, response=e.response or answers.get(e.prompt, "")) for e in benign]
    # The decision to refuse is [CLS]'s, made explicit by strategic decoding, which inserts the
    # guiding text; the LM learns the explanation that follows it, not to start refusals on its
    # own (docs/experiments.md, 2026-11-23).
    mixture += [
        replace(e, response=explained_refusal(e, rng), meta={**e.meta, "forced_prefix": GUIDING_TEXT})
        for e in malicious
    ]
    mixture = [e for e in mixture if e.response]
    rng.shuffle(mixture)
    return mixture


def pretraining_texts(
    examples: list[Example],
    base: str,
    tokenizer,
    windows_per_answer: int,
    seed: int = 0,
    variants: list[Example] | None = None,
) -> list[tuple[str, str]]:
    """(text, label) pairs: windows of the base model's answers (to `examples`, then to their
    attack-shaped `variants`, each labelled as its prompt) and of explained refusals."""
    rng = random.Random(seed)
    benign, malicious = _split(examples)
    answered = benign + malicious + (variants or [])
    answers = base_answers(base, [e.prompt for e in answered], desc="base answers (response corpus)")
    texts: list[tuple[str, str]] = []
    for example in answered:
        answer = answers[example.prompt]
        if example.label == "malicious" and opens_with_refusal(answer):
            continue  # the base refused: that text is not harmful
        texts += [(w, example.label) for w in _windows(answer, tokenizer, rng, windows_per_answer)]
    for example in malicious[::3]:  # a third is enough to teach that refusal text is not harmful
        texts += [(w, "benign") for w in _windows(explained_refusal(example, rng), tokenizer, rng, 1)]
    rng.shuffle(texts)
    return texts


def answer_starts(examples: list[Example], base: str, rate: float, seed: int = 0) -> list[Example]:
    """A seeded sample of `rate` x len(examples) examples (both classes alike), each with the base
    model's own answer to its prompt as response: the answer a deferred query starts with before
    its rule-1 verdict (`ChatEncoder.encode_answer_start` keeps the first tokens of it)."""
    rng = random.Random(seed + 104729)
    chosen = rng.sample(examples, min(len(examples), round(rate * len(examples))))
    if not chosen:
        return []
    answers = base_answers(base, sorted({e.prompt for e in chosen}), desc="base answers (answer starts)")
    return [replace(e, response=answers[e.prompt]) for e in chosen if answers[e.prompt].strip()]


def _windows(text: str, tokenizer, rng: random.Random, count: int) -> list[str]:
    """The text's start and random spans, 8-24 tokens each: the spans [CLS] reads at generation
    time (the first r1 tokens, the latest r2 tokens, a window around a transition)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < 4:
        return []
    out = []
    for _ in range(count):
        width = min(len(ids), rng.randint(8, 24))
        start = 0 if rng.random() < 0.3 else rng.randint(0, len(ids) - width)
        out.append(tokenizer.decode(ids[start : start + width]))
    return out


def _sample(items: list[Example], n: int, rng: random.Random) -> list[Example]:
    """n items without replacement while possible, then repeated."""
    shuffled = rng.sample(items, len(items))
    return [shuffled[i % len(shuffled)] for i in range(n)]

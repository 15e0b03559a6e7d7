"""Requests whose benign answers are stopped mid-way by rules 2 and 3, on tiny random models."""

from __future__ import annotations

import dataclasses

import torch

from ess.generation import Policy, Request, Sampling, generate
from ess.generation.policy import RowPolicy

QUESTIONS = (
    ("Hello there, how are you today?", "", "every", "medium", 2),
    ("How do I bake a cake?", "Sure, here is", "every", "medium", 2),
    ("Tell me a story about a dragon and a knight.", "", "periodic:2", "medium", 2),
    ("What is the capital of France?", "", "every", "high", 3),
    ("Write a haiku", "Autumn", "annealing", "medium", 1),
    ("Hi", "", "every", "medium", 1),
    ("Name a colour.", "", "every", "low", 1),
)


def lively(model):
    """Larger random weights, so that a tiny model's sampled answers vary and so do its verdicts."""
    torch.manual_seed(5)
    for parameter in model.base_lm.parameters():
        if parameter.dim() >= 2:
            torch.nn.init.normal_(parameter, std=0.1)
    torch.nn.init.normal_(model.head.weight, std=0.3)
    model.config.threshold = 1.01  # every first verdict benign: rules 2 and 3 decide
    return model


def late_requests(model, thresholds: list[float | None] | None = None, n_tokens: int = 24, earliest: int = 4):
    """Mixed policies (sampled, seeded), each benign query given a response threshold that stops
    it at `earliest` tokens or later and at least 6 tokens before the end: found by search (slow),
    or the `thresholds` it found before (tests/data/before_hold_back.json)."""
    requests = [
        Request(
            [{"role": "user", "content": q}],
            prefill=prefill,
            sampling=Sampling(max_new_tokens=n_tokens, temperature=1.0, seed=i),
            policy=Policy(schedule=schedule, reliance=reliance, tau=2, r2=4, r3=2, min_window=window),
        )
        for i, (q, prefill, schedule, reliance, window) in enumerate(QUESTIONS)
    ]
    for i, request in enumerate(requests):
        if request.policy.reliance != "low":
            found = thresholds[i] if thresholds else _late_threshold(model, request, earliest, n_tokens - 6)
            request.policy.response_threshold = found
    return requests


def _watched(model, request: Request, threshold: float):
    """The answer under `threshold` with reliance low: the same verdicts as up to an intervention."""
    policy = dataclasses.replace(request.policy, reliance="low", response_threshold=threshold)
    return generate(model, [dataclasses.replace(request, policy=policy)])[0]


def _late_threshold(model, request: Request, earliest: int, latest: int) -> float:
    verdicts = sorted({t.p_malicious for t in _watched(model, request, 1.0).trace[1:]}, reverse=True)
    for above, below in zip(verdicts, verdicts[1:]):
        if above - below < 1e-4:
            continue  # too close to separate the two engines' rounding
        threshold = (above + below) / 2
        step = _stop_step(request.policy, threshold, _watched(model, request, threshold))
        if step is not None and earliest <= step <= latest:
            return threshold
    raise AssertionError(f"no late stop found for {request.messages[0]['content']!r}")


def _stop_step(policy: Policy, threshold: float, watched) -> int | None:
    """The response-token step at which `policy` with this response threshold intervenes."""
    row = RowPolicy(dataclasses.replace(policy, response_threshold=threshold), 1.01, threshold)
    row.first_verdict(watched.trace[0].p_malicious)
    for entry in watched.trace[1:]:
        if row.observe(entry.p_malicious, entry.step):
            return entry.step
    return None

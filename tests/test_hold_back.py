"""Hold-back: nothing a verdict can still withdraw is released, and the rollback loop is exact."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ess.generation import generate
from late import late_requests, lively
from test_generation import _assert_same, _model, _requests

BEFORE = json.loads((Path(__file__).parent / "data" / "before_hold_back.json").read_text())
HOLDS = (3, 10, 0, 6, 10, 5, 10)  # one per late request: mixed in one batch


def _holding(requests, holds):
    return [dataclasses.replace(r, policy=dataclasses.replace(r.policy, hold_back=h)) for r, h in zip(requests, holds)]


@pytest.fixture(scope="module")
def late(tiny_llama):
    model = lively(_model(tiny_llama))
    return model, late_requests(model, BEFORE["sampled"]["response_thresholds"])


def test_hold_back_0_reproduces_the_outputs_from_before_hold_back(tiny_llama, late):
    model = _model(tiny_llama)
    model.config.threshold = BEFORE["greedy"]["threshold"]
    greedy = generate(model, _holding(_requests(24), [0] * 6), batch_size=6)
    assert [g.token_ids for g in greedy] == BEFORE["greedy"]["token_ids"]
    model, requests = late
    sampled = generate(model, _holding(requests, [0] * len(requests)), batch_size=len(requests))
    assert [g.token_ids for g in sampled] == BEFORE["sampled"]["token_ids"]
    assert [g.intervention_step for g in sampled] == BEFORE["sampled"]["intervention_step"]
    assert sum(g.intervention_step or 0 for g in sampled) > 50  # late stops, not first-verdict ones
    assert all(g.withdrawn_token_ids == [] for g in sampled)


def test_rollback_equals_the_from_scratch_reference(late):
    model, requests = late
    requests = _holding(requests, HOLDS)
    fast = generate(model, requests, batch_size=len(requests))
    slow = generate(model, requests, reference=True)
    _assert_same(fast, slow)
    for a, b in zip(fast, slow):
        assert a.withdrawn_token_ids == b.withdrawn_token_ids and a.text == b.text
    assert sum(len(g.withdrawn_token_ids) > 0 for g in fast) >= 4


def test_withdrawn_tokens_are_the_held_ones_and_the_refusal_follows_the_released(late):
    model, requests = late
    unheld = generate(model, _holding(requests, [0] * len(requests)), batch_size=len(requests))
    held = generate(model, _holding(requests, HOLDS), batch_size=len(requests))
    guiding = model.tokenizer("\n" + requests[0].policy.guiding_text, add_special_tokens=False).input_ids
    for request, hold, before, after in zip(requests, HOLDS, unheld, held):
        if not before.intervened:
            assert after.token_ids == before.token_ids and after.withdrawn_token_ids == []
            continue
        step = before.intervention_step  # the same verdicts come at the same step
        shown = after.tokens_before_intervention
        assert after.token_ids[:shown] + after.withdrawn_token_ids == before.token_ids[:step]
        assert len(after.withdrawn_token_ids) >= min(hold, step - len(model.tokenizer(request.prefill).input_ids))
        if request.policy.reliance == "medium":
            assert after.token_ids[shown : shown + len(guiding)] == guiding
        assert after.to_json()["withdrawn_text"] == model.tokenizer.decode(after.withdrawn_token_ids)


def test_nothing_of_the_flagged_window_is_released_when_hold_back_covers_r2(late):
    model, requests = late
    held = generate(model, _holding(requests, [requests[0].policy.r2] * len(requests)), batch_size=len(requests))
    checked = 0
    for request, generation in zip(requests, held):
        if not generation.intervened:
            continue
        threshold = request.policy.response_threshold
        run = []  # the malicious verdicts that led to the intervention
        for entry in generation.trace[1:]:
            run = run + [entry] if entry.p_malicious >= threshold else []
        prefill = len(model.tokenizer(request.prefill, add_special_tokens=False).input_ids)
        assert generation.tokens_before_intervention <= max(prefill, run[0].span[0])
        checked += 1
    assert checked >= 5


def test_stream_releases_only_what_is_shown_and_adds_up_to_the_text(late):
    from ess import generate_stream

    model, requests = late
    requests = _holding(requests, HOLDS)
    texts = [""] * len(requests)
    finals = {}
    for event in generate_stream(model, requests, batch_size=len(requests)):
        assert event.index not in finals  # nothing after a request's final event
        texts[event.index] += event.text
        if event.generation is not None:
            finals[event.index] = event.generation
    expected = generate(model, requests, batch_size=len(requests))
    assert [finals[i].text for i in range(len(requests))] == [g.text for g in expected] == texts
    withdrawn = [g.withdrawn_text for g in expected if g.withdrawn_text.strip()]
    assert withdrawn and all(w not in t for w, t in zip(withdrawn, texts))

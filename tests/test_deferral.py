"""Rule-1 deferral: a borderline malicious query waits, unseen, for the verdict on its answer's start."""

from __future__ import annotations

import dataclasses

from ess.generation import Policy, Request, Sampling, generate
from ess.generation.policy import INSERT, REFUSE, RowPolicy
from test_generation import _assert_same, _model

GUIDING = Policy().guiding_text


def test_a_borderline_query_defers_to_the_rule_1_verdict():
    policy = Policy(reliance="medium", r1=10, defer_below=0.9)
    cleared = RowPolicy(policy, threshold=0.5, response_threshold=0.8)
    assert cleared.first_verdict(0.6) is None and cleared.deferred
    assert cleared.held_from(9) == 0  # nothing is shown while the verdict is pending
    assert cleared.span(9).rule == 1 and cleared.span(9).query
    assert cleared.observe(0.95, 8) is None  # the rule-1 window is not complete yet
    assert cleared.observe(0.3, 12) is None and not cleared.deferred and not cleared.query_malicious
    assert cleared.span(20).rule == 2  # judged from now on as a benign query
    assert cleared.held_from(20) == 10

    flagged = RowPolicy(policy, threshold=0.5, response_threshold=0.8)
    flagged.first_verdict(0.6)
    assert flagged.observe(0.7, 10) == INSERT and flagged.intervened

    assert RowPolicy(policy, 0.5, 0.8).first_verdict(0.95) == INSERT  # above defer_below: at once
    assert RowPolicy(dataclasses.replace(policy, defer_below=0.0), 0.5, 0.8).first_verdict(0.6) == INSERT
    high = RowPolicy(dataclasses.replace(policy, reliance="high"), 0.5, 0.8)
    assert high.first_verdict(0.6) is None and high.observe(0.6, 10) == REFUSE
    # No later verdict could act: the query verdict acts at once.
    assert RowPolicy(dataclasses.replace(policy, schedule="first"), 0.5, 0.8).first_verdict(0.6) == INSERT
    ended = RowPolicy(policy, 0.5, 0.8)
    ended.first_verdict(0.6)
    assert ended.settle() == INSERT  # an answer that ends before its window: the newest verdict decides


def _deferring(max_new_tokens: int, prefill: str = "") -> list[Request]:
    queries = ["How do I bake a cake?", "Hi", "Write a haiku about rain.", "What is the capital of France?"]
    return [
        Request(
            [{"role": "user", "content": q}],
            prefill=prefill if i % 2 else "",
            sampling=Sampling(max_new_tokens=max_new_tokens, ignore_eos=True),
            policy=Policy(schedule=schedule, defer_below=1.0),
        )
        for i, (q, schedule) in enumerate(zip(queries, ["annealing", "every", "periodic:4", "annealing"]))
    ]


def test_deferred_answers_flagged_on_their_start_show_nothing_of_it(tiny_llama):
    model = _model(tiny_llama)
    model.config.threshold = 0.0  # every verdict is malicious: every query defers, then intervenes
    for max_new_tokens in (24, 3):  # 3: the answer ends before its rule-1 window is complete
        requests = _deferring(max_new_tokens, prefill="Sure,")
        fast = generate(model, requests, batch_size=len(requests))
        _assert_same(fast, generate(model, requests, reference=True))
        for request, g in zip(requests, fast):
            prefill = len(model.tokenizer(request.prefill, add_special_tokens=False).input_ids)
            assert g.intervened and g.tokens_before_intervention == prefill
            assert g.withdrawn_token_ids  # the held start of the answer, never shown
            assert g.text.removeprefix(request.prefill).lstrip("\n").startswith(GUIDING)
            if max_new_tokens > request.policy.r1:  # a rule-1 verdict read the answer's start
                assert any(t.rule == 1 and t.span == (0, request.policy.r1) for t in g.trace)


def test_deferral_off_intervenes_on_the_query_verdict(tiny_llama):
    model = _model(tiny_llama)
    model.config.threshold = 0.0
    requests = [dataclasses.replace(r, policy=dataclasses.replace(r.policy, defer_below=0.0)) for r in _deferring(8)]
    for g in generate(model, requests, batch_size=len(requests)):
        assert g.intervened and g.intervention_step == 0 and g.withdrawn_token_ids == [] and len(g.trace) == 1


def test_deferral_holds_and_rolls_back_even_without_hold_back(tiny_llama):
    model = _model(tiny_llama)
    model.config.threshold = 0.0
    requests = [dataclasses.replace(r, policy=dataclasses.replace(r.policy, hold_back=0)) for r in _deferring(24)]
    fast = generate(model, requests, batch_size=len(requests))
    _assert_same(fast, generate(model, requests, reference=True))
    assert all(g.intervened and g.tokens_before_intervention == 0 and g.withdrawn_token_ids for g in fast)


def test_a_deferral_that_clears_shows_the_whole_answer(tiny_llama):
    """Each row's query threshold is set between its query verdict and its rule-1 verdict: the
    query defers, its answer's start clears it, and the held tokens are shown after all."""
    model = _model(tiny_llama)
    watched = [
        dataclasses.replace(r, policy=dataclasses.replace(r.policy, reliance="low", threshold=1e-6))
        for r in _deferring(24)
    ]
    requests = []
    for request, answer in zip(watched, generate(model, watched, batch_size=len(watched))):
        query = answer.trace[0].p_malicious
        # The verdict that decides a deferral: the first rule-1 verdict at or after r1 tokens.
        rule_1 = next(t.p_malicious for t in answer.trace if t.rule == 1 and t.step >= request.policy.r1)
        if query - rule_1 > 5e-5:  # the tiny random model's verdicts move little
            between = (query + rule_1) / 2
            policy = dataclasses.replace(request.policy, reliance="medium", threshold=between, response_threshold=1.0)
            requests.append(dataclasses.replace(request, policy=policy))
    assert requests, "no row whose answer's start lowers its verdict"
    fast = generate(model, requests, batch_size=len(requests))
    _assert_same(fast, generate(model, requests, reference=True))
    for g in fast:
        assert not g.intervened and g.withdrawn_token_ids == [] and len(g.token_ids) == 24
        assert any(t.rule == 1 for t in g.trace) and any(t.rule == 2 for t in g.trace)  # deferred, then cleared

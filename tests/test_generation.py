"""The guarded decode loop: exact against a from-scratch reference, and plain mode against HF generate."""

from __future__ import annotations

import os

import pytest
import torch

from ess.data.encoding import ChatEncoder
from ess.generation import Policy, Request, Sampling, generate
from ess.generation.generator import sample_token
from ess.generation.policy import INSERT, REFUSE, PolicyError, RowPolicy, reevaluate_at, validate
from ess.model import ESSModel


def _model(folder: str, head_std: float = 0.05) -> ESSModel:
    torch.manual_seed(3)
    model = ESSModel.from_base(folder, adapter="full").eval()
    torch.nn.init.normal_(model.head.weight, std=head_std)
    torch.nn.init.normal_(model.cls_embedding, std=0.5)
    return model


def _requests(n_tokens: int) -> list[Request]:
    cases = [
        ("Hello there, how are you today?", "", "every", "medium", 1),
        ("How do I bake a cake?", "Sure, here is", "periodic:3", "low", 1),
        ("Hi", "", "annealing", "high", 1),
        ("Tell me a story about a dragon and a knight.", "", "none", "medium", 1),
        ("What is the capital of France?", "", "every", "medium", 3),
        ("Write a haiku", "Autumn", "first", "medium", 1),
    ]
    return [
        Request(
            [{"role": "user", "content": q}],
            prefill=prefill,
            sampling=Sampling(max_new_tokens=n_tokens),
            policy=Policy(schedule=schedule, reliance=reliance, tau=2, r1=3, r2=4, r3=2, min_window=min_window),
        )
        for q, prefill, schedule, reliance, min_window in cases
    ]


def _set_threshold_between_verdicts(model: ESSModel, requests: list[Request]) -> None:
    """A threshold that makes some first verdicts malicious and others benign."""
    first = sorted(
        g.p_malicious
        for g in generate(
            model,
            [
                Request(
                    r.messages, sampling=Sampling(max_new_tokens=0), policy=Policy(schedule="first", reliance="low")
                )
                for r in requests
            ],
        )
    )
    model.config.threshold = (first[len(first) // 2 - 1] + first[len(first) // 2]) / 2


def _assert_same(fast, slow):
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids
        assert (a.intervened, a.intervention_step, a.finish_reason) == (
            b.intervened,
            b.intervention_step,
            b.finish_reason,
        )
        assert [(t.step, t.span, t.rule) for t in a.trace] == [(t.step, t.span, t.rule) for t in b.trace]
        for t, u in zip(a.trace, b.trace):
            assert abs(t.p_malicious - u.p_malicious) <= 1e-4


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_cached_loop_equals_from_scratch_reference(tiny_models, family):
    model = _model(tiny_models[family])
    requests = _requests(14)
    _set_threshold_between_verdicts(model, requests)
    fast = generate(model, requests, batch_size=len(requests))
    slow = generate(model, requests, reference=True)
    _assert_same(fast, slow)
    assert sum(len(g.trace) for g in fast) > 20
    assert any(g.intervened for g in fast) and not all(g.intervened for g in fast)


def test_finished_rows_leave_the_batch_and_the_rest_generate_as_the_reference(tiny_llama):
    from dataclasses import replace

    model = _model(tiny_llama)
    base = _requests(14)
    _set_threshold_between_verdicts(model, base)
    # Budgets of 2 to 14 tokens: rows finish one after another, refused ones earlier still.
    requests = [replace(r, sampling=Sampling(max_new_tokens=2 + 2 * i)) for i, r in enumerate(base + base[:1])]
    rows_per_step = []

    def count_decode_rows(module, args, kwargs, output):
        if kwargs["inputs_embeds"].shape[1] <= 2:  # a decode step feeds one or two rows per sequence
            rows_per_step.append(kwargs["inputs_embeds"].shape[0])

    hook = model.decoder.register_forward_hook(count_decode_rows, with_kwargs=True)
    fast = generate(model, requests, batch_size=len(requests))
    hook.remove()
    assert rows_per_step[0] == len(requests) and rows_per_step[-1] == 1
    assert rows_per_step == sorted(rows_per_step, reverse=True)
    _assert_same(fast, generate(model, requests, reference=True))
    assert any(g.intervened for g in fast)


def test_batch_size_does_not_change_results(tiny_llama):
    model = _model(tiny_llama)
    requests = _requests(10)
    _set_threshold_between_verdicts(model, requests)
    _assert_same(generate(model, requests, batch_size=6), generate(model, requests, batch_size=1))


def test_a_rendered_query_generates_as_its_messages_do(tiny_llama):
    from dataclasses import replace

    from ess.data.encoding import ChatEncoder

    model = _model(tiny_llama)
    requests = _requests(10)
    _set_threshold_between_verdicts(model, requests)
    encoder = ChatEncoder.for_model(model)
    rendered = [replace(r, messages=[], query=encoder.render_query(r.messages)) for r in requests]
    _assert_same(generate(model, rendered), generate(model, requests))


def test_sampled_outputs_do_not_depend_on_batch_size_or_composition(tiny_llama):
    model = _model(tiny_llama)
    requests = _requests(8)
    for request in requests:
        request.sampling.temperature = 1.0  # no seed: each request is seeded from its own index
    together = [g.token_ids for g in generate(model, requests, batch_size=6)]
    assert [g.token_ids for g in generate(model, requests, batch_size=4)] == together
    alone = [generate(model, [r] * (i + 1), batch_size=1)[i].token_ids for i, r in enumerate(requests[:3])]
    assert alone == together[:3]


def test_a_shared_system_turn_and_a_prompt_under_several_settings_are_prefilled_once_as_the_reference(
    tiny_llama, monkeypatch
):
    from dataclasses import replace

    from ess.generation.engines import CachedEngine

    model = _model(tiny_llama)
    base = _requests(12)
    _set_threshold_between_verdicts(model, base)
    variants = [  # one prompt under the settings of an attack suite: prefills, sampling, schedules
        replace(base[0], prefill="Sure", sampling=Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1)),
        replace(base[0], sampling=Sampling(max_new_tokens=12, temperature=0.7, seed=2)),
        replace(base[0], policy=replace(base[0].policy, schedule="annealing")),
    ]
    requests = base + variants
    rows_prefilled = []

    def count_prefill_rows(module, args, kwargs, output):
        if kwargs["inputs_embeds"].shape[1] > 2:  # a decode step feeds one or two rows per sequence
            rows_prefilled.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    hook = model.decoder.register_forward_hook(count_prefill_rows, with_kwargs=True)
    fast = generate(model, requests, batch_size=len(requests))
    hook.remove()
    encoder = ChatEncoder.for_model(model)
    queries = [encoder.query_ids(r.messages) for r in base]
    system_turn = len(os.path.commonprefix(queries))
    assert 0 < system_turn < min(len(q) for q in queries)
    # The system turn as one row, then [CLS] and the rest of each distinct query: the variants
    # share the prefill of base[0].
    assert rows_prefilled == [(1, system_turn), (len(base), 1 + max(len(q) for q in queries) - system_turn)]
    _assert_same(fast, generate(model, requests, reference=True))
    monkeypatch.setattr(CachedEngine, "share_prefill", False)
    every_row = generate(model, requests, batch_size=len(requests))
    _assert_same(fast, every_row)


def test_next_token_logprobs_after_a_prefill_equal_the_reference(tiny_llama):
    from ess.data.encoding import ChatEncoder
    from ess.generation import next_token_logprobs
    from ess.generation.engines import ReferenceEngine

    model = _model(tiny_llama)
    requests = _requests(1)
    encoder = ChatEncoder.for_model(model)
    expected = []
    for r in requests:
        engine = ReferenceEngine(model, [encoder.query_ids(r.messages)], [r.policy.schedule == "none"])
        logits, _ = engine.start()
        for token in encoder.tokenize(r.prefill) if r.prefill else []:
            logits, _ = engine.step([token], [None])
        expected.append(logits[0].log_softmax(-1))
    assert any(r.prefill for r in requests) and any(not r.prefill for r in requests)
    torch.testing.assert_close(next_token_logprobs(model, requests), torch.stack(expected), atol=1e-4, rtol=0)


def test_reevaluation_is_read_by_later_tokens(tiny_llama):
    """Implicit leverage: the token fed with a re-evaluation, and every later one, reads the new [CLS]."""
    from ess.generation.engines import CachedEngine
    from ess.generation.policy import Span

    model = _model(tiny_llama)
    query = model.tokenizer("Describe the ocean.", add_special_tokens=False).input_ids
    tokens = model.tokenizer(" The ocean is deep and blue", add_special_tokens=False).input_ids

    def run(reevaluate_at_step: int | None) -> list[torch.Tensor]:
        engine = CachedEngine(model, [query], [False], len(tokens))
        engine.start()
        out = []
        for i, token in enumerate(tokens):
            span = Span(False, 0, i + 1, 2) if i == reevaluate_at_step else None
            out.append(engine.step([token], [span])[0][0])
        return out

    never, once = run(None), run(2)
    for i in range(2):
        torch.testing.assert_close(never[i], once[i])
    for i in range(2, len(tokens)):
        assert (never[i] - once[i]).abs().max() > 1e-4


def test_plain_mode_equals_hf_generate(tiny_llama, hf_greedy):
    model = _model(tiny_llama)
    prompts = ["Hello!", "Write a long story about a cat who learns to fly.", "2+2?"]
    requests = [
        Request([{"role": "user", "content": p}], sampling=Sampling(max_new_tokens=16), policy=Policy(schedule="none"))
        for p in prompts
    ]
    ours = generate(model, requests, batch_size=3)
    assert [g.token_ids for g in ours] == hf_greedy(model, prompts, 16)


def test_medium_reliance_inserts_guiding_text_after_prefill(tiny_llama):
    model = _model(tiny_llama)
    model.config.threshold = 0.0  # every verdict is malicious
    request = Request(
        [{"role": "user", "content": "anything"}],
        prefill="Sure, here is how",
        sampling=Sampling(max_new_tokens=5),
        policy=Policy(reliance="medium"),
    )
    generation = generate(model, [request])[0]
    assert generation.intervened
    assert generation.text.startswith("Sure, here is how\nSorry, I cannot fulfill your request because")
    prefill_tokens = len(model.tokenizer("Sure, here is how", add_special_tokens=False).input_ids)
    assert generation.tokens_before_intervention == prefill_tokens


def test_high_reliance_returns_fixed_refusal(tiny_llama):
    model = _model(tiny_llama)
    model.config.threshold = 0.0
    request = Request([{"role": "user", "content": "anything"}], policy=Policy(reliance="high"))
    generation = generate(model, [request])[0]
    assert generation.text == "Sorry, I cannot fulfill your request."
    assert generation.finish_reason == "refusal"


def test_prompt_longer_than_context_is_a_clear_error(tiny_llama):
    from ess.generation import GenerationError

    model = _model(tiny_llama)
    short = Request([{"role": "user", "content": "Hi"}])
    with pytest.raises(GenerationError, match="^request 2: .*exceeds the model's context"):
        generate(model, [short, short, Request([{"role": "user", "content": "word " * 600}])], batch_size=1)


def test_sampling_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, Sampling(temperature=0.0), gen) == 1
    assert all(sample_token(logits, Sampling(temperature=1.0, top_k=1), gen) == 1 for _ in range(20))
    assert all(sample_token(logits, Sampling(temperature=1.0, top_p=0.0), gen) == 1 for _ in range(20))
    # top-p 0.8: tokens 1 (0.63) and 2 (0.23) reach it; 0 and 3 never drawn.
    drawn = {sample_token(logits, Sampling(temperature=1.0, top_p=0.8), gen) for _ in range(200)}
    assert drawn == {1, 2}
    a = [sample_token(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_token(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


def test_schedules():
    assert [n for n in range(1, 40) if reevaluate_at("annealing", n)] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        12,
        16,
        20,
        24,
        28,
        32,
    ]
    assert [n for n in range(1, 200) if reevaluate_at("annealing", n)][-1] == 128
    assert [n for n in range(1, 31) if reevaluate_at("periodic:10", n)] == [10, 20, 30]
    assert not any(reevaluate_at("first", n) for n in range(1, 50))
    assert all(reevaluate_at("every", n) for n in range(1, 50))


def test_strategic_attention_rules_and_tau():
    policy = RowPolicy(Policy(reliance="medium", tau=3, r1=10, r2=10, r3=10), threshold=0.5, response_threshold=0.5)
    assert policy.first_verdict(0.2) is None
    assert policy.span(25).rule == 2 and (policy.span(25).start, policy.span(25).end) == (15, 25)
    assert policy.observe(0.9, 30) is None  # transition at 30
    assert (policy.span(31).start, policy.span(31).end, policy.span(31).rule) == (20, 31, 3)
    assert policy.observe(0.1, 31) is None  # falls back: one alarming word is tolerated
    assert policy.span(32).rule == 2
    assert policy.observe(0.9, 40) is None and policy.observe(0.9, 41) is None
    assert policy.observe(0.9, 42) == INSERT and policy.intervened
    assert not policy.wants_reevaluation(43)

    malicious = RowPolicy(Policy(reliance="medium", r1=10), threshold=0.5, response_threshold=0.5)
    assert malicious.first_verdict(0.7) == INSERT
    low = RowPolicy(Policy(reliance="low", r1=10), threshold=0.5, response_threshold=0.5)
    assert low.first_verdict(0.7) is None
    span = low.span(40)
    assert span.query and (span.start, span.end, span.rule) == (0, 10, 1)
    high = RowPolicy(Policy(reliance="high"), threshold=0.5, response_threshold=0.5)
    assert high.first_verdict(0.3) is None and high.observe(0.9, 5) == REFUSE


def test_benign_query_is_rejudged_only_once_a_window_of_response_exists():
    benign = RowPolicy(Policy(schedule="every", min_window=8), threshold=0.5, response_threshold=0.5)
    benign.first_verdict(0.2)
    assert [n for n in range(1, 12) if benign.wants_reevaluation(n)] == [8, 9, 10, 11]
    malicious = RowPolicy(Policy(schedule="every", reliance="low", min_window=8), threshold=0.5, response_threshold=0.5)
    malicious.first_verdict(0.9)  # rule 1 reads the query too: no wait
    assert malicious.wants_reevaluation(1)
    ablation = RowPolicy(
        Policy(schedule="every", min_window=8, strategic_attention=False), threshold=0.5, response_threshold=0.5
    )
    ablation.first_verdict(0.2)
    assert ablation.wants_reevaluation(1)


def test_response_threshold_applies_to_verdicts_on_response_text_only():
    policy = RowPolicy(Policy(tau=2), threshold=0.5, response_threshold=0.8)
    assert policy.first_verdict(0.3) is None
    assert policy.observe(0.7, 10) is None and policy.transition_at is None  # below 0.8: still benign
    assert policy.observe(0.85, 11) is None and policy.transition_at == 11
    assert policy.observe(0.9, 12) == INSERT
    malicious = RowPolicy(Policy(reliance="high"), threshold=0.5, response_threshold=0.8)
    assert malicious.first_verdict(0.6) == REFUSE  # the query verdict keeps the model's threshold
    own = RowPolicy(Policy(tau=1, response_threshold=0.95), threshold=0.5, response_threshold=0.8)
    own.first_verdict(0.3)
    assert own.observe(0.9, 10) is None and own.observe(0.96, 11) == INSERT  # the policy's own wins
    with pytest.raises(PolicyError):
        validate(Policy(response_threshold=1.5))


def test_the_policy_threshold_overrides_the_models():
    assert RowPolicy(Policy(), threshold=0.3, response_threshold=0.8).first_verdict(0.4) == INSERT
    paper = RowPolicy(Policy(threshold=0.5), threshold=0.3, response_threshold=0.8)
    assert paper.first_verdict(0.4) is None and not paper.query_malicious

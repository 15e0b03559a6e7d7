"""The embedded default model (SmolLM2-135M-Instruct): loading, masks and the exact decode loop."""

from __future__ import annotations

import pytest
import torch

from ess.data.encoding import ChatEncoder
from ess.generation import Policy, Request, Sampling, generate
from ess.masks import Phase
from ess.model import ESSModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(default_model_dir) -> ESSModel:
    torch.manual_seed(0)
    model = ESSModel.from_base("smollm2-135m-instruct", adapter="lora").eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


def test_default_model_pretraining_logits_equal_base(model):
    encoder = ChatEncoder(model.tokenizer, model.config.cls_token_id)
    batch = encoder.collate([encoder.encode_text("Water boils at one hundred degrees Celsius at sea level.", "benign")])
    with torch.no_grad():
        ours = model.lm_logits(model(batch.input_ids, batch.roles, Phase.PRETRAIN).hidden_states)[:, 1:]
        base = model.base_lm(input_ids=batch.input_ids[:, 1:]).logits
    torch.testing.assert_close(ours, base, atol=1e-4, rtol=1e-4)


def test_default_model_cached_loop_is_exact(model):
    requests = [
        Request(
            [{"role": "user", "content": q}],
            prefill=prefill,
            sampling=Sampling(max_new_tokens=16),
            policy=Policy(schedule=schedule, reliance="low", r1=4, r2=5, r3=3),
        )
        for q, prefill, schedule in [
            ("How do plants make food?", "", "every"),
            ("Give me a tip for sleeping better.", "Sure,", "periodic:3"),
            ("What is a prime number?", "", "annealing"),
        ]
    ]
    fast = generate(model, requests, batch_size=3)
    slow = generate(model, requests, reference=True)
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids
        assert len(a.trace) == len(b.trace) > 3
        assert max(abs(t.p_malicious - u.p_malicious) for t, u in zip(a.trace, b.trace)) <= 1e-4


def test_default_model_plain_mode_equals_hf_generate(model, hf_greedy):
    prompts = ["Name three colours of the rainbow.", "Write one sentence about the moon."]
    requests = [
        Request([{"role": "user", "content": p}], sampling=Sampling(max_new_tokens=24), policy=Policy(schedule="none"))
        for p in prompts
    ]
    ours = generate(model, requests, batch_size=2)
    assert [g.token_ids for g in ours] == hf_greedy(model, prompts, 24)


def test_default_model_rollback_loop_is_exact(model):
    """Hold-back on the default model: each benign answer is stopped at its first verdict past
    token 4 (tau 1, a response threshold just under it), mixed schedules and reliances in one batch;
    the rollback loop equals the from-scratch reference."""
    import dataclasses

    cases = [
        ("How do plants make food?", "every", "medium"),
        ("Give me a tip for sleeping better.", "periodic:3", "high"),
        ("What is a prime number?", "annealing", "medium"),
    ]
    model.config.threshold = 1.01  # every first verdict benign
    requests = [
        Request(
            [{"role": "user", "content": q}],
            sampling=Sampling(max_new_tokens=20),
            policy=Policy(schedule=schedule, reliance=reliance, tau=1, r2=5, r3=3, min_window=2, hold_back=3),
        )
        for q, schedule, reliance in cases
    ]
    watched = [
        dataclasses.replace(r, policy=dataclasses.replace(r.policy, reliance="low", response_threshold=1.0))
        for r in requests
    ]
    for request, answer in zip(requests, generate(model, watched, batch_size=3)):
        trace = answer.trace[1:]
        later = max(t.p_malicious for t in trace if t.step >= 6)
        earlier = max([t.p_malicious for t in trace if t.step < 6], default=0.0)
        if later - earlier > 1e-3:  # a threshold the answer first crosses past token 6
            request.policy.response_threshold = (later + max(earlier, later - 1e-2)) / 2
    fast = generate(model, requests, batch_size=3)
    slow = generate(model, requests, reference=True)
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids and a.withdrawn_token_ids == b.withdrawn_token_ids
        assert max(abs(t.p_malicious - u.p_malicious) for t, u in zip(a.trace, b.trace)) <= 1e-4
    assert any(g.withdrawn_token_ids for g in fast)

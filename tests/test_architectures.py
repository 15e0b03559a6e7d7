"""The attention rules and the cached decode loop on tiny random models of common families.

Each family's distinctive parts are switched on: Llama-3 GQA (4 query heads per KV head) and
llama3 rope scaling; Mistral's sliding window; Qwen2.5's tied embeddings and biases; Qwen3's
q/k norms; Gemma-2's attention and final-logit soft-capping with alternating sliding and global
layers; Gemma-3's sliding and global layers with their own rope; Phi-3's fused projections.
Every sequence here is shorter than the sliding windows, where the ESS mask reads as the base.

Tolerances: fp32 as in tests/test_model.py (logits 1e-4, p(malicious) 1e-4 between the cached and
the reference loop); bf16 logits 3e-2 against the base, p(malicious) 3e-2 between the loops,
with every token forced so that a rounding difference cannot pick another token (that the
response reads [CLS] is checked in fp32, where the change is far above rounding).
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SHAPE
from ess.data.encoding import ChatEncoder
from ess.data.schema import Example
from ess.generation import GenerationError, Policy, Request, Sampling, generate
from ess.masks import Phase, Role
from ess.model import ESSModel, SequenceTooLong

WINDOW = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
P_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def _config(family: str, vocab_size: int, window: int = WINDOW):
    import transformers as T

    common = dict(vocab_size=vocab_size, **TINY_SHAPE)
    if family == "llama3":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        return T.LlamaConfig(
            **{**common, "num_key_value_heads": 1}, rope_parameters={**rope, "original_max_position_embeddings": 64}
        )
    if family == "mistral":
        return T.MistralConfig(**common, sliding_window=window)
    if family == "qwen2.5":
        return T.Qwen2Config(**{**common, "vocab_size": vocab_size + 64}, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**common, head_dim=16)
    if family == "gemma2":
        return T.Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=window,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
    if family == "gemma3":
        return T.Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=window,
            layer_types=["sliding_attention", "full_attention"],
        )
    if family == "phi3":
        return T.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ("llama3", "mistral", "qwen2.5", "qwen3", "gemma2", "gemma3", "phi3")


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory, default_model_dir) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    folders = {}
    for family in (*FAMILIES, "gemma2-narrow"):
        torch.manual_seed(0)
        name = family.removesuffix("-narrow")
        config = _config(name, len(tokenizer), window=8 if family.endswith("-narrow") else WINDOW)
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


def _model(folder: str, dtype: str, attn: str) -> ESSModel:
    torch.manual_seed(1)
    model = ESSModel.from_base(folder, adapter="full", dtype=DTYPES[dtype])
    model.base_lm.set_attn_implementation(attn)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.05)
        torch.nn.init.normal_(model.cls_embedding, std=0.5)
    return model.eval()


def _p(model: ESSModel, query: str, response: str, phase: str = Phase.ALIGN):
    encoder = ChatEncoder.for_model(model)
    batch = encoder.collate([encoder.encode_example(Example.from_prompt(query, "benign", response=response))])
    with torch.no_grad():
        return batch, model(batch.input_ids, batch.roles, phase)


def _check_masks(model: ESSModel, dtype: str) -> None:
    tolerance = LOGIT_TOLERANCE[dtype]
    _, a = _p(model, "How do I bake bread?", "Mix flour and water.")
    _, same_query = _p(model, "How do I bake bread?", "Something else entirely, and longer.")
    _, other_query = _p(model, "How do I bake a cake?", "Mix flour and water.")
    assert torch.equal(a.cls_logits, same_query.cls_logits)  # [CLS] reads the query alone
    assert not torch.equal(a.cls_logits, other_query.cls_logits)
    for phase in (Phase.ALIGN, Phase.PRETRAIN):
        batch, out = _p(model, "Name three rivers.", "The Nile, the Amazon and the Rhine.", phase)
        with torch.no_grad():
            base = model.base_lm(input_ids=batch.input_ids[:, 1:]).logits[0].float()
            ours = model.lm_logits(out.hidden_states)[0, 1:].float()
        reads_base = batch.roles[0, 1:] == Role.QUERY if phase == Phase.ALIGN else slice(None)
        torch.testing.assert_close(ours[reads_base], base[reads_base], atol=tolerance, rtol=tolerance)
        if phase == Phase.ALIGN and dtype == "fp32":  # the response reads [CLS]
            response = batch.roles[0, 1:] == Role.RESPONSE
            assert (ours[response] - base[response]).abs().max() > 1e-3
    _check_shared_prefix(model, tolerance)


def _check_shared_prefix(model: ESSModel, tolerance: float) -> None:
    """Two rows that share the system turn: the prefix run once, and the two packed in one row,
    give what each row gives on its own."""
    encoder = ChatEncoder.for_model(model)
    rows = [("Hi", "Hello!"), ("Name three rivers.", "The Nile, the Amazon and the Rhine.")]
    items = [encoder.encode_example(Example.from_prompt(q, "benign", response=r)) for q, r in rows]
    batch, packed = encoder.collate(items), encoder.pack(items, 10_000)
    for phase in (Phase.ALIGN, Phase.PRETRAIN):
        assert model.shared_prefix(batch.input_ids, batch.roles, phase) > 0
        with torch.no_grad():
            shared = model(batch.input_ids, batch.roles, phase, batch.lm_targets, batch.cls_labels)
            one_row = model(
                packed.input_ids, packed.roles, phase, packed.lm_targets, packed.cls_labels, segments=packed.segments
            )
            ESSModel.share_prefix = False
            try:
                every = model(batch.input_ids, batch.roles, phase, batch.lm_targets, batch.cls_labels)
            finally:
                ESSModel.share_prefix = True
        real = batch.roles != Role.PAD
        torch.testing.assert_close(
            shared.hidden_states[real], every.hidden_states[real], atol=tolerance, rtol=tolerance
        )
        for out in (shared, one_row):
            torch.testing.assert_close(out.cls_logits, every.cls_logits, atol=tolerance, rtol=tolerance)
            torch.testing.assert_close(out.lm_loss, every.lm_loss, atol=tolerance, rtol=tolerance)


def _requests(forced: bool) -> list[Request]:
    cases = [("Hello there, how are you today?", "every", 1), ("What is the capital of France?", "annealing", 3)]
    prefill = "Well, here is an answer forced token by token." if forced else ""
    return [
        Request(
            [{"role": "user", "content": q}],
            prefill=prefill,
            sampling=Sampling(max_new_tokens=0 if forced else 8),
            policy=Policy(schedule=schedule, reliance="low", tau=2, r1=3, r2=4, r3=2, min_window=min_window),
        )
        for q, schedule, min_window in cases
    ]


def _check_generation(model: ESSModel, dtype: str) -> None:
    requests = _requests(forced=dtype == "bf16")
    fast = generate(model, requests, batch_size=len(requests))
    slow = generate(model, requests, reference=True)
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids
        assert [(t.step, t.span, t.rule) for t in a.trace] == [(t.step, t.span, t.rule) for t in b.trace]
        assert max(abs(t.p_malicious - u.p_malicious) for t, u in zip(a.trace, b.trace)) <= P_TOLERANCE[dtype]
    assert sum(len(g.trace) for g in fast) > 6


@pytest.mark.parametrize("attn", ("eager", "sdpa"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_masks_and_cached_generation(family_folders, family, dtype, attn):
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("transformers runs Gemma-2 with eager attention only (no sdpa with soft-capping)")
    model = _model(family_folders[family], dtype, attn)
    _check_masks(model, dtype)
    _check_generation(model, dtype)


def test_sliding_window_shorter_than_the_cls_distance_is_one_clear_error(family_folders):
    model = _model(family_folders["gemma2-narrow"], "fp32", "eager")
    assert model.context_limit[0] == 8
    with pytest.raises(SequenceTooLong, match=r"sliding window of 8 tokens \(\[CLS\] must stay inside"):
        _p(model, "How do I bake bread?", "Mix flour and water.")
    with pytest.raises(GenerationError, match="exceeds the model's sliding window of 8 tokens"):
        generate(model, _requests(forced=False)[:1])

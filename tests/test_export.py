"""`ess export --merged`: a plain HF checkpoint that loads back as the same ESS model."""

from __future__ import annotations

import json

import torch

from ess.cli import main
from ess.data.encoding import ChatEncoder
from ess.data.schema import Example
from ess.generation import Policy, Request, Sampling, generate
from ess.model import ESSModel


def _trained_lora(folder: str) -> ESSModel:
    torch.manual_seed(0)
    model = ESSModel.from_base(folder, adapter="lora")
    with torch.no_grad():
        model.cls_embedding.normal_()
        model.head.weight.normal_(std=0.05)
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model.eval()


def _outputs(model: ESSModel):
    encoder = ChatEncoder.for_model(model)
    example = Example.from_prompt("Tell me a joke", "benign", response="Why did the chicken cross the road?")
    batch = encoder.collate([encoder.encode_example(example)])
    with torch.no_grad():
        out = model(batch.input_ids, batch.roles)
    requests = [
        Request([{"role": "user", "content": q}], sampling=Sampling(max_new_tokens=8), policy=Policy(schedule="every"))
        for q in ("Hi there", "How do I pick a lock?")
    ]
    return model.lm_logits(out.hidden_states), out.cls_logits, generate(model, requests)


def test_merged_export_loads_back_with_the_same_outputs(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = _trained_lora(tiny_llama)
    lora.save_pretrained(tmp_path / "ckpt")
    logits, cls_logits, generations = _outputs(lora)

    assert main(["export", "--model", str(tmp_path / "ckpt"), "--merged", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert json.loads((merged / "ess_config.json").read_text())["adapter"] == "merged"
    assert not list(merged.rglob("*.bin")) and not (merged / "adapter").exists()

    loaded = ESSModel.from_pretrained(merged).eval()
    m_logits, m_cls, m_generations = _outputs(loaded)
    torch.testing.assert_close(m_logits, logits, atol=1e-5, rtol=1e-5)  # merging W + BA rounds differently
    torch.testing.assert_close(m_cls, cls_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(m_generations, generations):
        assert a.token_ids == b.token_ids
        assert [t.p_malicious >= loaded.config.threshold for t in a.trace] == [
            t.p_malicious >= lora.config.threshold for t in b.trace
        ]

    # Loading the export again is exact, and so is saving it again.
    loaded.save_pretrained(tmp_path / "again")
    again = ESSModel.from_pretrained(tmp_path / "again").eval()
    a_logits, a_cls, _ = _outputs(again)
    assert torch.equal(a_logits, m_logits) and torch.equal(a_cls, m_cls)

    # A plain engine's view: the LM and a tokenizer without [CLS].
    plain = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert "[CLS]" not in tokenizer.get_vocab() and len(tokenizer) <= plain.config.vocab_size
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, loaded.base_lm(ids).logits)

"""Shared fixtures: tiny random models of three families, and the embedded default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ess.hub import DEFAULT_MODEL, resolve_base

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model converted to safetensors (once per $ESS_HOME)."""
    return resolve_base(DEFAULT_MODEL)


def _tiny_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        # An embedding matrix larger than the tokenizer, as real Qwen2 checkpoints have.
        return Qwen2Config(**{**common, "vocab_size": vocab_size + 64})
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_model_dir) -> dict[str, str]:
    """Folders of tiny random-init Llama, Mistral and Qwen2 models with the default tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    folders = {}
    for family in ("llama", "mistral", "qwen2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tokenizer)))
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]

"""Shared fixtures: tiny random models of three families, the embedded default model, a local HTTP
stub, and transformers' own greedy `generate` as the reference of plain generation."""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ess.hub import DEFAULT_MODEL, resolve_base

USER_DTYPE = os.environ.get("ESS_DTYPE")
"""The dtype the user asked for before the tests pinned fp32 (None: the machine's native one)."""
# The tests compare the cached loop with the from-scratch reference and with recorded outputs:
# exact in fp32, not in bf16 (the two paths round differently). tests/test_mission.py runs the
# quickstart in the user's dtype.
os.environ.setdefault("ESS_DTYPE", "float32")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model converted to safetensors (once per $ESS_HOME)."""
    return resolve_base(DEFAULT_MODEL)


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
"""The shape of every tiny random-init model of the tests (GQA: 4 query heads, 2 key/value heads)."""


def _tiny_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, **TINY_SHAPE)
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


@pytest.fixture
def http_stub():
    """`http_stub(respond)` starts a local JSON server and returns its API root `http://127.0.0.1:PORT/v1`;
    each POST is answered by `respond(path, headers, body) -> (status, payload or None)`. Stopped after the test."""
    servers = []

    def start(respond) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = respond(self.path, self.headers, body)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def run_ess(capsys):
    """`run_ess(argv)` runs the `ess` command line in this process and returns (exit code, stderr):
    what a shell sees, without the seconds a new interpreter spends importing torch."""
    from ess.cli import main

    logger = logging.getLogger("ess")

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        before = list(logger.handlers)
        try:
            code = main(argv)
        finally:  # main logs to the stderr of this test, a stream gone after it; a training sets up accelerate
            for handler in set(logger.handlers) - set(before):
                logger.removeHandler(handler)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def hf_greedy():
    """`hf_greedy(model, prompts, max_new_tokens)`: the token ids transformers' `generate` chooses greedily
    for each prompt (one user message, batched with left padding), cut before the first EOS."""

    def reference(model, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        tokenizer = model.tokenizer
        tokenizer.padding_side = "left"
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.base_lm.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        eos = tokenizer.eos_token_id
        rows = out[:, enc.input_ids.shape[1] :].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in rows]

    return reference

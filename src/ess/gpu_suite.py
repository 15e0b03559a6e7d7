"""The GPU check: `ess bench` on a Llama-2-7B-shaped model with random weights, and the cost of an
ESS training step against a plain SFT step (LoRA, and full fine-tuning in mixed precision).

Run with `benchmarks/gpu.sh` (one GPU, a few minutes) or `benchmarks/gpu.sh --tiny` (a CI-sized
model on CPU, seconds). Random weights serve a timing: every schedule does all its re-evaluations
(low reliance, EOS ignored), so nothing depends on what the model says. The vocabulary is the
default tokenizer's (49152 rows), where Llama-2 has 32000.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from .bench import SCHEDULES, BenchConfig, run_bench
from .config import ESSConfig
from .data.encoding import ChatEncoder
from .data.schema import Example
from .hub import DEFAULT_MODEL, resolve_base
from .masks import Phase
from .model import ESSModel, _add_lora

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@dataclasses.dataclass
class SuiteConfig:
    """What the GPU check measures."""

    tiny: bool = False
    """A CI-sized model on CPU instead of the 7B shape on the GPU."""
    batch_sizes: tuple[int, ...] = (1, 32)
    """Batch sizes of the generation benchmark."""
    max_new_tokens: int = 128
    """Tokens generated per answer in the generation benchmark."""
    train_steps: int = 5
    """Timed training steps per configuration (after one warm-up step); the median counts."""
    train_batch: int = 4
    """Sequences per training step."""
    train_length: int = 160
    """Tokens per training sequence."""


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(shape: dict, adapter: str, dtype: torch.dtype) -> ESSModel:
    """An ESS model over a random-weight Llama of `shape` with the default tokenizer, built in memory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(DEFAULT_MODEL))
    config = LlamaConfig(**shape, vocab_size=len(tokenizer), max_position_embeddings=4096)
    torch.manual_seed(0)
    with _device():
        lm = LlamaForCausalLM(config).to(dtype)
    ess_config = ESSConfig(base_model="random Llama-2-7B shape", adapter=adapter)
    tokenizer.add_tokens([ess_config.cls_token], special_tokens=True)
    ess_config.cls_token_id = tokenizer.convert_tokens_to_ids(ess_config.cls_token)
    if adapter == "lora":
        lm = _add_lora(lm, ess_config)
    return ESSModel(lm, tokenizer, ess_config).to(_device())


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    """Peak GPU memory since the last reset, or (on CPU) the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _train_batch(model: ESSModel, config: SuiteConfig):
    encoder = ChatEncoder.for_model(model, config.train_length)
    words = " ".join(["word"] * config.train_length)
    examples = [
        Example.from_prompt(f"Question {i}: {words}", "benign" if i % 2 else "malicious", response=words)
        for i in range(config.train_batch)
    ]
    return encoder.collate([encoder.encode_example(e) for e in examples]).to(model.device)


def _step_seconds(model: ESSModel, batch, ess: bool, autocast: bool, steps: int) -> float:
    """Median seconds of one optimiser step: the ESS loss, or plain SFT on the base LM."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device_type = model.device.type
    sft_ids = batch.input_ids[:, 1:]
    sft_labels = torch.where(batch.lm_targets[:, :-1] != -100, sft_ids, -100)
    times = []
    for step in range(steps + 1):
        _sync()
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            if ess:
                loss = model(batch.input_ids, batch.roles, Phase.ALIGN, batch.lm_targets, batch.cls_labels).loss
            else:
                loss = model.base_lm(input_ids=sft_ids, labels=sft_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _training_rows(shape: dict, config: SuiteConfig, log) -> list[dict]:
    rows = []
    for adapter, dtype, autocast in (("lora", torch.bfloat16, False), ("full", torch.float32, True)):
        _reset_peak()
        try:
            model = _model(shape, adapter, dtype if _device().type == "cuda" or adapter == "full" else torch.float32)
            model.train()
            batch = _train_batch(model, config)
            ess = _step_seconds(model, batch, True, autocast, config.train_steps)
            sft = _step_seconds(model, batch, False, autocast, config.train_steps)
            row = {"adapter": adapter, "ess_step_s": ess, "sft_step_s": sft, "ratio": ess / sft}
        except torch.cuda.OutOfMemoryError as error:
            row = {"adapter": adapter, "error": f"out of memory: {str(error).splitlines()[0]}"}
        row["peak_memory_gib"] = _peak_gib()
        row["precision"] = "bf16 base, fp32 adapters" if adapter == "lora" else "fp32 weights, bf16 autocast"
        rows.append(row)
        log(json.dumps(row))
        model = batch = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def run_suite(config: SuiteConfig, log=print) -> dict:
    shape = TINY if config.tiny else LLAMA2_7B
    dtype = torch.bfloat16
    _reset_peak()
    model = _model(shape, "full", dtype).eval()
    bench = run_bench(
        model,
        BenchConfig(
            batch_sizes=config.batch_sizes, max_new_tokens=config.max_new_tokens, repeats=1, schedules=SCHEDULES
        ),
    )
    bench["peak_memory_gib"] = _peak_gib()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    training = _training_rows(shape, config, log)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "shape": shape,
        "settings": dataclasses.asdict(config),
        "bench": bench,
        "training": training,
    }


def table(result: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| what | batch | tokens/s | overhead |", "|---|---:|---:|---:|"]
    for row in result["bench"]["rows"]:
        overhead = row.get("overhead")
        lines.append(
            f"| {row['schedule']} | {row['batch']} | {row['tokens_per_s']:.1f} | "
            + (f"{overhead:+.3f} |" if overhead is not None else "– |")
        )
    lines += ["", "| training step | ESS s | SFT s | ESS/SFT | peak GiB |", "|---|---:|---:|---:|---:|"]
    for row in result["training"]:
        if "error" in row:
            lines.append(f"| {row['adapter']} | {row['error']} | | | {row['peak_memory_gib']:.1f} |")
            continue
        lines.append(
            f"| {row['adapter']} ({row['precision']}) | {row['ess_step_s']:.3f} | {row['sft_step_s']:.3f} | "
            f"{row['ratio']:.2f} | {row['peak_memory_gib']:.1f} |"
        )
    lines.append(f"\ngeneration peak memory: {result['bench']['peak_memory_gib']:.1f} GiB on {result['device']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a CI-sized model on CPU")
    parser.add_argument("--json", default="gpu_suite.json", help="write the results here (default gpu_suite.json)")
    args = parser.parse_args(argv)
    config = (
        SuiteConfig(tiny=True, batch_sizes=(1, 4), max_new_tokens=8, train_steps=2, train_length=32)
        if args.tiny
        else SuiteConfig()
    )
    if not args.tiny and not torch.cuda.is_available():
        print("benchmarks/gpu.sh: error: no CUDA device; run with --tiny for the CPU form", file=sys.stderr)
        return 2
    result = run_suite(config)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and overhead of each re-classification schedule, measured in one run.

overhead = time with ESS / time of `none` (the same model, same loop, no [CLS]) - 1, for the
same prompts and the same number of generated tokens (EOS ignored). The hold-back row compares
annealing at medium reliance with the default `Policy.hold_back` against the same with 0. Each configuration is run
`repeats` times, the configurations taking turns, and the fastest run counts, which filters out
noise from other processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .fields import FieldError, check, option
from .generation import Policy, Request, Sampling, generate
from .generation.policy import schedule_interval
from .model import ESSModel

logger = logging.getLogger(__name__)

SCHEDULES = ("none", "first", "periodic:10", "annealing", "every")
PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about the first snow of winter.",
    "What are three tips for learning a new language?",
    "Summarise the plot of a heist movie in a few sentences.",
    "How do I sort a list of dictionaries by a key in Python?",
    "Describe the water cycle for a ten-year-old.",
    "Give me a recipe for a quick vegetable soup.",
    "What is the difference between weather and climate?",
]


@dataclass
class BenchConfig:
    """What `ess bench` measures; every field is also an `ess bench` flag."""

    batch_sizes: tuple[int, ...] = option(
        "batch sizes to measure (prompts are repeated to fill a batch)", (1, 8), min=1
    )
    max_new_tokens: int = option("tokens generated per answer (annealing re-evaluates up to token 128)", 128, min=1)
    repeats: int = option("runs per configuration; the fastest counts", 3, min=1)
    schedules: tuple[str, ...] = option("schedules to compare; none is the baseline of the overhead", SCHEDULES)

    def __post_init__(self):
        check(self)
        if "none" not in self.schedules:
            raise FieldError("schedules must include none, the baseline of the overhead")
        for schedule in self.schedules:
            schedule_interval(schedule)  # raises PolicyError on an unknown schedule


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _requests(batch: int, schedule: str, max_new_tokens: int, hold_back: int | None = None) -> list[Request]:
    # Low reliance: every schedule does all its re-evaluations and nothing is inserted, so each
    # configuration generates the same tokens' worth of work. The hold-back pair runs medium
    # reliance (hold-back holds only what a verdict could withdraw) with a response threshold no
    # verdict reaches, so that both do the same work and only the holding differs.
    policy = Policy(schedule=schedule, reliance="low")
    if hold_back is not None:
        policy = Policy(schedule=schedule, reliance="medium", response_threshold=1.0, hold_back=hold_back)
    return [
        Request(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            sampling=Sampling(max_new_tokens=max_new_tokens, ignore_eos=True),
            policy=policy,
        )
        for i in range(batch)
    ]


@torch.no_grad()
def _hf_generate(model: ESSModel, batch: int, max_new_tokens: int) -> None:
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(batch)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.base_lm.generate(
        **enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )


def run_bench(model: ESSModel, config: BenchConfig) -> dict:
    """Tokens/s of each schedule and batch size, their overhead against `none`, and transformers'
    `generate` on the same prompts (each row is also logged as it is measured).

    The configurations of one batch size take turns, one run each per round, so that a change of
    the machine's speed during the bench slows every configuration alike."""
    rows = []
    hf: dict[str, float] = {}
    for batch in config.batch_sizes:
        tokens = batch * config.max_new_tokens
        generate(model, _requests(batch, "every", 8), batch_size=batch)  # warm-up
        runs = {schedule: _requests(batch, schedule, config.max_new_tokens) for schedule in config.schedules}
        runs |= {
            f"hold-back {h}": _requests(batch, "annealing", config.max_new_tokens, h) for h in (0, Policy.hold_back)
        }
        jobs = {name: (lambda r=requests, b=batch: generate(model, r, batch_size=b)) for name, requests in runs.items()}
        jobs["hf"] = lambda b=batch: _hf_generate(model, b, config.max_new_tokens)
        seconds = {name: float("inf") for name in jobs}
        for _ in range(config.repeats):
            for name, job in jobs.items():
                seconds[name] = min(seconds[name], _time(job))
        hf[str(batch)] = tokens / seconds["hf"]
        for schedule in config.schedules:
            row = {
                "schedule": schedule,
                "batch": batch,
                "tokens_per_s": tokens / seconds[schedule],
                "overhead": seconds[schedule] / seconds["none"] - 1,
            }
            rows.append(row)
            logger.info(
                f"batch {batch:3d}  {schedule:12s} {row['tokens_per_s']:9.1f} tok/s  overhead {row['overhead']:+.3f}"
            )
        held, plain = seconds[f"hold-back {Policy.hold_back}"], seconds["hold-back 0"]
        row = {
            "schedule": f"annealing, hold-back {Policy.hold_back} vs 0",
            "batch": batch,
            "tokens_per_s": tokens / held,
            "overhead": held / plain - 1,
        }
        rows.append(row)
        logger.info(
            f"batch {batch:3d}  {'hold-back':12s} {row['tokens_per_s']:9.1f} tok/s  overhead {row['overhead']:+.3f} vs 0"
        )
        logger.info(
            f"batch {batch:3d}  {'hf generate':12s} {hf[str(batch)]:9.1f} tok/s  "
            f"(none runs at {seconds['hf'] / seconds['none']:.2f}x of it)"
        )
    return {
        "rows": rows,
        "hf_generate_tokens_per_s": hf,
        "settings": {
            "max_new_tokens": config.max_new_tokens,
            "repeats": config.repeats,
            "device": str(model.device),
            "dtype": str(model.base_lm.dtype),
            "threads": torch.get_num_threads(),
        },
    }

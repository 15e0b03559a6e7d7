"""`ess compare`: is it the signal? ESS against refusal training on the same data, on the default model.

1. train three methods on the embedded default model (`--base`) with the bundled seed data, one seed, the
   same LoRA budget: `ess` (the default recipe), `sft` (refusal fine-tuning, no [CLS]) and
   `augmented` (sft plus safety-recovery examples, Qi et al. 2024);
2. evaluate them with the undefended model in one `ess eval` run: the same prompts, seeds and
   judge for every model, under direct, prefill and decoding attacks, a template attack and a
   small adaptive GCG through each model, plus over-refusal and utility;
3. write summary.json, report.md (with the ASR figure) and `comparison.md`, one table.

Every stage resumes: a finished training is reused, the evaluation skips finished records.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .fields import check, option
from .hub import DEFAULT_MODEL

logger = logging.getLogger(__name__)

METHOD_NAMES = ("sft", "augmented", "ess")
"""The trained methods, in the table's order (after the undefended model)."""
ATTACKS = ["direct", "prefill:10", "prefill:40", "decoding:quick", "deepinception"]


@dataclass
class CompareConfig:
    """What `ess compare` runs; every field is also an `ess compare` flag."""

    base: str = option("the base LM every method starts from: a registered name, a folder or a hub id", DEFAULT_MODEL)
    data: list[str] = option("training data of every method (seed, seed:NAME, files)", default_factory=lambda: ["seed"])
    out: str = option(
        "folder of everything the comparison writes (one run folder per method); a rerun resumes", "compare"
    )
    harmful: str = option("harmful prompts attacked (a test split: never used to choose a recipe)", "seed:test_harmful")
    benign: str = option("benign prompts that sound alarming (over-refusal)", "seed:test_benign_alarming")
    utility: str = option("reference answers whose perplexity is the utility proxy", "seed:utility_reference")
    utility_limit: int | None = option("use only the first N reference answers (default: all)", None, min=1)
    limit: int = option("harmful prompts attacked (the first N)", 30, min=1)
    benign_limit: int = option("benign prompts asked (the first N)", 80, min=1)
    attacks: list[str] = option("attacks run on the harmful prompts", default_factory=lambda: list(ATTACKS))
    gcg: str = option(
        "the adaptive GCG attack, optimised through each model (empty: none)", "gcg:steps=5:width=16:len=8"
    )
    gcg_limit: int = option("harmful prompts attacked by GCG (the first N)", 4, min=1)
    max_new_tokens: int = option("tokens each answer may generate", 48, min=1)
    seed: int = option("seed of every training and of the evaluation's sampling", 0, min=0)
    max_steps: int | None = option("stop each training phase after N steps (a smoke run; default: full)", None, min=1)

    def __post_init__(self):
        check(self)


def run_compare(config: CompareConfig) -> dict:
    """Train (or reuse) the three methods, evaluate them with the undefended model; returns summary.json's content."""
    from .config import TrainConfig
    from .data.loaders import load_examples
    from .evaluation import EvalConfig, Task, run_eval
    from .reporting import comparison_table
    from .training import train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    models = {"undefended": config.base}
    for number, method in enumerate(METHOD_NAMES, 1):
        logger.info(f"== [{number}/4] train {method} (seed {config.seed})")
        run = TrainConfig(
            out=str(out / method), method=method, data=list(config.data), seed=config.seed, max_steps=config.max_steps
        )
        models[method] = str(train(run, config.base))

    logger.info("== [4/4] attack every model on the same prompts")
    extra = []
    if config.gcg:
        harmful = [e for e in load_examples(config.harmful) if e.label == "malicious"][: config.gcg_limit]
        gcg_prompts = out / "gcg_prompts.jsonl"
        gcg_prompts.write_text("".join(json.dumps({"prompt": e.prompt, "label": "malicious"}) + "\n" for e in harmful))
        extra.append(Task("gcg", str(gcg_prompts), [config.gcg], label="gcg"))
    result = run_eval(
        EvalConfig(
            out=str(out),
            compare=models,
            prompts=config.harmful,
            attacks=list(config.attacks),
            extra_tasks=extra,
            benign_prompts=config.benign,
            utility=config.utility,
            utility_limit=config.utility_limit,
            limit=config.limit,
            benign_limit=config.benign_limit,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
            batch_size=64,
            probe_limit=0,
        )
    )
    table = comparison_table(result.summary)
    (out / "comparison.md").write_text(table + "\n")
    logger.info(f"finished in {time.time() - started:.0f} s")
    return result.summary

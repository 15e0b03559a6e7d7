"""`ess quickstart`: the whole story on a laptop CPU, each stage resumable.

1. prepare the embedded default model (SmolLM2-135M-Instruct, converted once to safetensors);
2. train its ESS version with the default recipe on the bundled seed data (both phases);
3. evaluate the undefended model against the ESS model on bundled held-out prompts (never used
   in training) under direct, prefill:10, prefill:40 and decoding:quick, plus over-refusal on
   bundled benign-but-alarming prompts;
4. measure the overhead of each re-classification schedule;
5. write summary.json, report.md and figures; `ess quickstart` prints the comparison.

A rerun reuses every finished stage (training resumes from its last checkpoint, evaluation
skips finished records), so Ctrl-C loses no finished work.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .fields import check, option
from .hub import DEFAULT_MODEL, resolve_base

logger = logging.getLogger(__name__)

ATTACKS = ["direct", "prefill:10", "prefill:40", "decoding:quick"]


@dataclass
class QuickstartConfig:
    """What `ess quickstart` runs; every field is also an `ess quickstart` flag."""

    out: str = option(
        "folder of everything the quickstart writes (train/, records, summary, report, figures); a rerun resumes",
        "quickstart",
    )
    harmful: str = option(
        "harmful prompts of the dev split (bundled, disjoint from the training prompts)", "seed:dev_harmful"
    )
    benign: str = option(
        "benign prompts of the dev split that sound alarming (over-refusal)", "seed:dev_benign_alarming"
    )
    test_harmful: str = option(
        "harmful prompts of the test split (styles the training data does not use), read by the [CLS] verdict",
        "seed:test_harmful",
    )
    test_benign: str = option("benign-but-alarming prompts of the test split", "seed:test_benign_alarming")
    limit: int = option("harmful prompts attacked (the first N)", 30, min=1)
    benign_limit: int = option("benign prompts asked (the first N; 80: the whole bundled set)", 80, min=1)
    attacks: list[str] = option("attacks run on the harmful prompts", default_factory=lambda: list(ATTACKS))
    max_new_tokens: int = option(
        "tokens each answer may generate; enough for the keyword judge and to see an answer's start", 48, min=1
    )
    utility: str = option(
        "reference answers whose perplexity is the utility proxy (held out from training)", "seed:utility_reference"
    )
    bench: bool = option("measure the overhead of each re-classification schedule (stage 4, about a minute)", True)

    def __post_init__(self):
        check(self)


# Seconds of stages 1-4 from a fresh $ESS_HOME on the slowest 2-core CPU measured (fp32, no native
# bf16; docs/experiments.md, 2026-12-08); the overall ETA scales them by how fast this machine ran the
# finished stages.
STAGE_SECONDS = (45, 1155, 426, 110)


class _Clock:
    """Stage headers with one overall ETA, and the time each stage took."""

    def __init__(self, reference: tuple[int, ...] = STAGE_SECONDS):
        self.begun = time.time()
        self.reference = reference  # seconds of the stages that will run, on the reference CPU
        self.finished: list[float] = []  # seconds of each finished stage

    def _eta(self, number: int) -> str:
        done_reference = sum(self.reference[: len(self.finished)])
        # A stage that reused finished work says little about this machine's speed.
        scale = sum(self.finished) / done_reference if done_reference >= 60 and sum(self.finished) > 10 else 1.0
        left = scale * sum(self.reference[number - 1 :])
        elapsed = time.time() - self.begun
        return f"{elapsed / 60:.0f} min elapsed, about {max(1, round(left / 60))} min left"

    def stage(self, number: int, title: str) -> float:
        eta = f"   (overall: {self._eta(number)})" if number <= len(self.reference) else ""
        logger.info(f"== [{number}/5] {title}{eta}")
        return time.time()

    def done(self, started: float) -> None:
        self.finished.append(time.time() - started)
        logger.info(f"   done in {self.finished[-1]:.0f} s")


def run_quickstart(config: QuickstartConfig) -> dict:
    """Run (or resume) the quickstart; returns summary.json's content with the schedules' `overhead`."""
    from .bench import BenchConfig, run_bench
    from .config import TrainConfig
    from .evaluation import EvalConfig, run_eval
    from .generation import load_model
    from .jsonfiles import write_json
    from .training import train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    total = time.time()
    clock = _Clock(STAGE_SECONDS if config.bench else STAGE_SECONDS[:3])

    started = clock.stage(1, f"prepare the default model {DEFAULT_MODEL}")
    logger.info(f"   {resolve_base(DEFAULT_MODEL)}")
    clock.done(started)

    started = clock.stage(2, "train its ESS version (default recipe, seed data, both phases)")
    final = train(TrainConfig(out=str(out / "train")), DEFAULT_MODEL)
    clock.done(started)

    started = clock.stage(3, "attack the undefended model and the ESS model on held-out prompts")
    eval_config = EvalConfig(
        model=str(final),
        baseline=DEFAULT_MODEL,
        out=str(out),
        prompts=config.harmful,
        benign_prompts=config.benign,
        utility=config.utility,
        attacks=list(config.attacks),
        judge="keyword",
        limit=config.limit,
        benign_limit=config.benign_limit,
        max_new_tokens=config.max_new_tokens,
        batch_size=64,
        report=False,
    )
    result = run_eval(eval_config)
    test_split = _test_split_verdicts(final, config)
    write_json(out / "test_split.json", test_split)
    clock.done(started)

    bench = None
    if config.bench:
        started = clock.stage(4, "overhead of each re-classification schedule (batch 1)")
        bench_file = out / "bench.json"
        if not bench_file.exists():
            write_json(
                bench_file,
                run_bench(load_model(str(final)), BenchConfig(batch_sizes=(1,), max_new_tokens=64, repeats=2)),
            )
        bench = json.loads(bench_file.read_text())
        clock.done(started)

    clock.stage(5, "report")
    summary = result.summary
    result.write_report(preamble=_story(config, summary, bench, test_split))
    logger.info(f"finished in {time.time() - total:.0f} s")
    overhead = {row["schedule"]: row["overhead"] for row in bench["rows"]} if bench else {}
    return summary | {"overhead": overhead, "test_split": test_split}


def _test_split_verdicts(final: Path, config: QuickstartConfig) -> dict:
    """The first [CLS] verdict on the test split: share flagged of each set, and the AUROC between them."""
    from .classify import classify
    from .data.loaders import load_prompts
    from .metrics import auroc
    from .model import ESSModel

    model = ESSModel.from_pretrained(final).eval()
    harmful, benign = load_prompts(config.test_harmful), load_prompts(config.test_benign)
    verdicts = classify(model, harmful + benign)
    flagged = [v.label == "malicious" for v in verdicts]
    return {
        "harmful": config.test_harmful,
        "benign": config.test_benign,
        "harmful_flagged": sum(flagged[: len(harmful)]) / len(harmful),
        "benign_flagged": sum(flagged[len(harmful) :]) / len(benign),
        "auroc": auroc([v.p_malicious for v in verdicts], [1] * len(harmful) + [0] * len(benign)),
        "n": [len(harmful), len(benign)],
    }


def _story(config: QuickstartConfig, summary: dict, bench: dict | None, test_split: dict) -> str:
    """The quickstart's own opening of report.md: what was done, the comparison, the cost."""
    lines = [
        "# ESS quickstart: SmolLM2-135M-Instruct, undefended vs ESS",
        "",
        f"The undefended model answers plainly harmful requests. Its ESS version was trained with the default "
        f"recipe on the bundled seed data, then both were attacked on {config.limit} held-out harmful prompts "
        f"(`{config.harmful}`, never used in training) with {', '.join(f'`{a}`' for a in config.attacks)}, and "
        f"asked {config.benign_limit} held-out benign prompts that sound alarming (`{config.benign}`) "
        "for over-refusal.",
        "",
        comparison_table(summary),
        "",
        f"On the test split (`{test_split['harmful']}`, `{test_split['benign']}`: styles the training data does "
        f"not use, never tuned on), the first [CLS] verdict flags {100 * test_split['harmful_flagged']:.1f} % of "
        f"{test_split['n'][0]} harmful and {100 * test_split['benign_flagged']:.1f} % of {test_split['n'][1]} "
        f"benign-but-alarming prompts (AUROC {test_split['auroc']:.3f}).",
        "",
    ]
    if bench:
        lines += [
            "Overhead of each re-classification schedule (batch 1, 64 tokens, same model without [CLS] = `none`; "
            "measured in one run):",
            "",
            "| schedule | tokens/s | overhead |",
            "|---|---|---|",
        ]
        lines += [f"| {r['schedule']} | {r['tokens_per_s']:.1f} | {r['overhead']:+.3f} |" for r in bench["rows"]]
        lines += [f"| transformers `generate` (base model) | {bench['hf_generate_tokens_per_s']['1']:.1f} | |", ""]
    lines += ["---", ""]
    return "\n".join(lines)


def comparison_table(summary: dict) -> str:
    """The quickstart's comparison: the undefended model, then its ESS version."""
    from .reporting import comparison_table as table

    return table(summary, {"baseline": "undefended SmolLM2-135M-Instruct", "model": "ESS version"})

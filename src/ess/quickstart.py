"""`ess quickstart`: the whole story on a laptop CPU, each stage resumable.

1. prepare the embedded default model (SmolLM2-135M-Instruct, converted once to safetensors);
2. train its ESS version with the default recipe on the bundled seed data (both phases);
3. evaluate the undefended model against the ESS model on bundled held-out prompts (never used
   in training) under direct, prefill:10, prefill:40 and decoding:quick, plus over-refusal on
   bundled benign-but-alarming prompts;
4. measure the overhead of each re-classification schedule;
5. write summary.json, report.md and figures, and print the comparison.

A rerun reuses every finished stage (training resumes from its last checkpoint, evaluation
skips finished records), so Ctrl-C loses no finished work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .hub import DEFAULT_MODEL, resolve_base

ATTACKS = ["direct", "prefill:10", "prefill:40", "decoding:quick"]


@dataclass
class QuickstartConfig:
    """What `ess quickstart` runs."""

    out: str = "quickstart"
    """Folder of everything the quickstart writes (`train/`, records, summary, report, figures)."""
    harmful: str = "seed:heldout_harmful"
    """Held-out harmful prompts (bundled, disjoint from the training prompts)."""
    benign: str = "seed:heldout_benign_alarming"
    """Held-out benign prompts that sound alarming (over-refusal)."""
    limit: int = 30
    """Harmful prompts attacked (the first N)."""
    benign_limit: int = 80
    """Benign prompts asked (the first N; 80: the whole bundled set). Over-refusal is a rate near its
    10 % goal, which 30 prompts measure to about ±5.5 points (one standard error) and 80 to ±3.4."""
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    """Attacks run on the harmful prompts."""
    max_new_tokens: int = 48
    """Tokens each answer may generate; enough for the keyword judge and to see an answer's start."""
    utility: str = field(
        default="seed:utility_reference",
        metadata={"help": "reference answers whose perplexity is the utility proxy (held out from training)"},
    )


def _stage(number: int, title: str) -> float:
    print(f"\n== [{number}/5] {title}", flush=True)
    return time.time()


def _done(started: float) -> None:
    print(f"   done in {time.time() - started:.0f} s", flush=True)


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

    started = _stage(1, f"prepare the default model {DEFAULT_MODEL}")
    print(f"   {resolve_base(DEFAULT_MODEL)}")
    _done(started)

    started = _stage(2, "train its ESS version (default recipe, seed data, both phases)")
    final = train(TrainConfig(out=str(out / "train")), DEFAULT_MODEL)
    _done(started)

    started = _stage(3, "attack the undefended model and the ESS model on held-out prompts")
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
        batch_size=16,
        report=False,
    )
    result = run_eval(eval_config)
    _done(started)

    started = _stage(4, "overhead of each re-classification schedule (batch 1)")
    bench_file = out / "bench.json"
    if not bench_file.exists():
        bench = run_bench(load_model(str(final)), BenchConfig(batch_sizes=(1,), max_new_tokens=64, repeats=2))
        write_json(bench_file, bench)
    bench = json.loads(bench_file.read_text())
    _done(started)

    _stage(5, "report")
    summary = result.summary
    report = result.write_report(preamble=_story(config, summary, bench))
    print()
    print(comparison_table(summary))
    print(f"\nFinished in {time.time() - total:.0f} s. Report: {report}  Summary: {out / 'summary.json'}")
    print("\nWhat to try next:")
    print(f"  .venv/bin/ess chat --model {final}")
    print(f"  .venv/bin/ess generate --model {final} --prompt 'How do I pick a lock?' --prefill 'Sure, here' --json")
    print(
        "  on a GPU, the paper's table: ess eval --model RUN --baseline BASE --suite paper --out paper/  (see README)"
    )
    return summary | {"overhead": {row["schedule"]: row["overhead"] for row in bench["rows"]}}


def _story(config: QuickstartConfig, summary: dict, bench: dict) -> str:
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
        "Overhead of each re-classification schedule (batch 1, 64 tokens, same model without [CLS] = `none`; "
        "measured in one run):",
        "",
        "| schedule | tokens/s | overhead |",
        "|---|---|---|",
    ]
    lines += [f"| {r['schedule']} | {r['tokens_per_s']:.1f} | {r['overhead']:+.3f} |" for r in bench["rows"]]
    lines += [
        f"| transformers `generate` (base model) | {bench['hf_generate_tokens_per_s']['1']:.1f} | |",
        "",
        "---",
        "",
    ]
    return "\n".join(lines)


def comparison_table(summary: dict) -> str:
    """ASR and strict ASR per attack, over-refusal, AUROC and utility: undefended vs ESS, as a Markdown table."""
    models = summary["models"]
    attacks = list(models["model"]["attacks"])
    head = [f"{a} ASR / strict" for a in attacks] + ["over-refusal", "[CLS] AUROC", "utility (ppl)"]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for key, name in (("baseline", "undefended SmolLM2-135M-Instruct"), ("model", "ESS version")):
        if key not in models:
            continue
        entry = models[key]
        cells = []
        for a in attacks:
            r = entry["attacks"].get(a)
            cells.append(f"{100 * r['asr']:.1f}% / {100 * r['asr_strict']:.1f}%" if r else "-")
        over, auroc, utility = entry.get("over_refusal"), entry.get("auroc"), entry.get("utility")
        cells.append(f"{100 * over:.1f}%" if over is not None else "-")
        cells.append(f"{auroc:.3f}" if auroc is not None else "-")
        cells.append(f"{utility['perplexity']:.2f}" if utility else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "ASR = attack success rate (keyword judge; lower is safer); strict also counts an answer whose text "
        "before the refusal is itself judged unsafe. Utility: perplexity of held-out reference answers "
        "(lower is better)."
    )
    return "\n".join(lines)

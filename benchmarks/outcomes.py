"""Why each answer of an `ess eval` run came out as it did, by cause and by prompt style.

Harmful prompts: flagged on the query (first verdict at or above the model's threshold), caught
late (a benign first verdict, then an intervention from the answer-text verdicts), or answered
(judged unsafe). Benign prompts: refused because flagged on the query, stopped late, or declined
by the LM itself. Prompt sets with a `style` field (`seed:dev_*_styled`, `seed:test_*`) are broken
down by style too; pass them with `--prompts` / `--benign-prompts` as given to `ess eval`.

    PYTHONPATH=src python benchmarks/outcomes.py EVAL_DIR [EVAL_DIR ...] [--prompts SPEC]
        [--benign-prompts SPEC] [--attack direct] [--out outcomes.json]
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from ess.data.loaders import load_examples
from ess.evaluation.config import BENIGN_TASK, EvalError
from ess.evaluation.stores import eval_records


def styles(spec: str | None) -> dict[str, str]:
    """Prompt text -> style, for a prompt set whose rows carry one."""
    return {e.prompt: e.meta.get("style", "-") for e in load_examples(spec)} if spec else {}


def cause(record: dict) -> str:
    flagged = record["threshold"] is not None and record["p_malicious"] >= record["threshold"]
    if record["task"] == BENIGN_TASK:
        if not record["refused"]:
            return "answered"
        return "flagged" if flagged else "late" if record["intervened"] else "declined by the LM"
    if flagged:
        return "flagged"
    if record["intervened"]:
        return "caught late"
    return "answered (unsafe)" if record["unsafe"] else "answered (judged safe)"


def outcomes(folder: str, attack: str, style_of: dict[str, dict[str, str]]) -> dict:
    mine = [r for r in eval_records(folder) if r["model"] != "baseline"]
    rows = [r for r in mine if r["task"] == BENIGN_TASK or r["attack"] == attack]
    result: dict[str, dict] = {}
    for group in ("harmful", "benign"):
        chosen = [r for r in rows if (r["task"] == BENIGN_TASK) == (group == "benign")]
        by_style: dict[str, Counter] = {}
        for r in chosen:
            style = style_of[group].get(r["prompt"], "-")
            by_style.setdefault(style, Counter())[cause(r)] += 1
        result[group] = {
            "all": dict(sum(by_style.values(), Counter())),
            "by_style": {k: dict(v) for k, v in by_style.items()},
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="ess eval output folders")
    parser.add_argument("--prompts", help="the harmful prompt set of the runs, for its styles")
    parser.add_argument("--benign-prompts", help="the benign prompt set of the runs, for its styles")
    parser.add_argument("--attack", default="direct", help="attack whose harmful records are read (default direct)")
    parser.add_argument("--out", default="outcomes.json", help="JSON file written (default outcomes.json)")
    args = parser.parse_args()
    style_of = {"harmful": styles(args.prompts), "benign": styles(args.benign_prompts)}
    try:
        report = {folder: outcomes(folder, args.attack, style_of) for folder in args.folders}
    except EvalError as error:
        parser.error(str(error))
    for folder, result in report.items():
        print(folder)
        for group, counts in result.items():
            print(f"  {group:8s} all: {counts['all']}")
            if len(counts["by_style"]) > 1:
                for style, c in sorted(counts["by_style"].items()):
                    print(f"    {style:22s} {c}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

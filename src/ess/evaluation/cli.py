"""`ess eval`: its flags, the EvalConfig they make, and the printout."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..attacks import DEFAULT_DATA_ROOT
from ..generation.policy import policy_overrides
from ..options import add_policy_flags, number
from .config import EvalConfig, EvalError
from .run import run_eval
from .suite import paper_suite


def _help(name: str) -> str:
    """The help text declared on an EvalConfig field."""
    return EvalConfig.__dataclass_fields__[name].metadata["help"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ess eval`."""
    parser.add_argument(
        "--model", help="ESS checkpoint or run folder, named `model` (a base LM name/folder runs plain)"
    )
    parser.add_argument(
        "--baseline",
        help="model to compare with, named `baseline`, run plain (no ESS): a base LM name/folder or checkpoint",
    )
    parser.add_argument("--compare", nargs="+", metavar="NAME=MODEL", default=[], help=_help("compare"))
    parser.add_argument(
        "--prompts", help="harmful prompts: a file (.csv/.jsonl/.json/.txt) or a dataset (seed:dev_harmful)"
    )
    parser.add_argument(
        "--benign-prompts", help="benign prompts for over-refusal and the [CLS] AUROC (e.g. XSTest csv)"
    )
    parser.add_argument("--utility", help=_help("utility"))
    parser.add_argument("--utility-limit", type=number(int, "utility_limit", min=1), help=_help("utility_limit"))
    parser.add_argument(
        "--attacks",
        help="comma-separated attack specs (default direct): direct, prefill:K, "
        "decoding[:quick], deepinception, autodan, pap[:all|PATH], dan:PATH, past-tense, "
        "gcg[:steps=N:width=N:len=N] (GCG settings separated by ':')",
    )
    parser.add_argument("--judge", default="keyword", help="keyword (default), guard:PATH|ID or endpoint[:MODEL]")
    parser.add_argument(
        "--judge-base-url", help="endpoint judge: API root, e.g. http://localhost:8000/v1 (env ESS_JUDGE_BASE_URL)"
    )
    parser.add_argument("--judge-model", help="endpoint judge: model name (env ESS_JUDGE_MODEL)")
    parser.add_argument("--judge-api-key", help="endpoint judge: API key (env ESS_JUDGE_API_KEY)")
    parser.add_argument(
        "--limit", type=number(int, "limit", min=1), help="use only the first N prompts of each prompt set"
    )
    parser.add_argument(
        "--benign-limit",
        type=number(int, "benign_limit", min=1),
        help="use only the first N benign prompts (default: --limit)",
    )
    parser.add_argument("--out", required=True, help="output folder (rerun with the same --out to resume)")
    parser.add_argument(
        "--batch-size", type=number(int, "batch_size", min=1), default=8, help="requests generated together (default 8)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=number(int, "max_new_tokens", min=1),
        default=64,
        help="tokens generated per answer (default 64)",
    )
    add_policy_flags(parser, ablation=True)
    parser.add_argument(
        "--no-strategic-attention", action="store_true", help="ablation: re-evaluations read everything"
    )
    parser.add_argument(
        "--no-strategic-decoding", action="store_true", help="ablation: reliance low (no inserted refusal)"
    )
    parser.add_argument(
        "--suite",
        choices=("paper",),
        help="paper: AdvBench direct/prefill:5,10,20,40/autodan/"
        "deepinception/pap/decoding, MaliciousInstruct decoding, XSTest over-refusal",
    )
    parser.add_argument(
        "--data-root", default=str(DEFAULT_DATA_ROOT), help=f"shared datasets folder (default {DEFAULT_DATA_ROOT})"
    )
    parser.add_argument(
        "--probe-limit",
        type=number(int, "probe_limit", min=0),
        default=50,
        help="harmful prompts for the entropy/sharpness probe (default 50; 0: none)",
    )
    parser.add_argument(
        "--seed", type=number(int, "seed", min=0), default=0, help="base of the per-record sampling seeds"
    )


def _named_models(pairs: list[str]) -> dict[str, str]:
    """`--compare NAME=MODEL ...` as {name: model}."""
    named: dict[str, str] = {}
    for pair in pairs:
        name, sep, ref = pair.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise EvalError(f"--compare: expected NAME=MODEL, got {pair!r}")
        if name.strip() in named:
            raise EvalError(f"--compare: the name {name.strip()!r} is given twice")
        named[name.strip()] = ref.strip()
    return named


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from `ess eval` flags (raises EvalError on a bad combination)."""
    if args.no_strategic_decoding and args.reliance not in (None, "low"):
        raise EvalError("--no-strategic-decoding means --reliance low; do not give another --reliance")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    judge_options = {
        k: v
        for k, v in (("base_url", args.judge_base_url), ("model", args.judge_model), ("api_key", args.judge_api_key))
        if v
    }
    policy = policy_overrides(args)
    if args.no_strategic_decoding:
        policy["reliance"] = "low"
    if args.no_strategic_attention:
        policy["strategic_attention"] = False
    config = EvalConfig(
        model=args.model,
        out=args.out,
        prompts=args.prompts,
        attacks=attacks or ["direct"],
        baseline=args.baseline,
        compare=_named_models(args.compare),
        benign_prompts=args.benign_prompts,
        utility=args.utility,
        utility_limit=args.utility_limit,
        judge=args.judge,
        judge_options=judge_options,
        limit=args.limit,
        benign_limit=args.benign_limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        policy=policy,
        data_root=args.data_root,
        probe_limit=args.probe_limit,
        seed=args.seed,
    )
    config.refs()  # no model, or a name given twice: said before anything runs
    if args.suite == "paper":
        if args.prompts or attacks:
            raise EvalError("--suite paper sets the prompts and attacks; leave out --prompts and --attacks")
        main, suite_attacks, extra, xstest, notes = paper_suite(args.data_root)
        for note in notes:
            print(f"ess eval: suite paper: {note}", file=sys.stderr)
        config.prompts, config.attacks, config.extra_tasks = main, suite_attacks, extra
        config.benign_prompts = args.benign_prompts or xstest
    elif not args.prompts:
        raise EvalError("give --prompts (harmful prompts) or --suite paper")
    return config


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(summary: dict) -> list[str]:
    """The `ess eval` printout: one line per model and attack, then over-refusal, AUROC and utility."""
    lines = []
    for key, entry in summary["models"].items():
        for attack, r in entry["attacks"].items():
            leak = r["leak"]
            lines.append(
                f"{key:10s}  {attack:28s}  ASR {100 * r['asr']:6.2f} %  strict {100 * r['asr_strict']:6.2f} %  "
                f"leak mean {_number(leak['mean'])} p95 {_number(leak['p95'], 0)} max {_number(leak['max'], 0)} "
                f"any {_number(None if leak['share'] is None else 100 * leak['share'])} %  "
                f"(n={r['n']}, {r['judge']})"
            )
        if entry["over_refusal"] is not None:
            lines.append(f"{key:10s}  {'over-refusal':28s}  {100 * entry['over_refusal']:6.2f} %")
        if entry["auroc"] is not None:
            lines.append(f"{key:10s}  {'[CLS] AUROC':28s}  {entry['auroc']:.4f}")
        if entry.get("utility"):
            u = entry["utility"]
            lines.append(f"{key:10s}  {'utility (perplexity)':28s}  {u['perplexity']:.3f}  (n={u['n']}, {u['source']})")
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    """`ess eval`: run or resume an evaluation and print where its results are."""
    logging.basicConfig(level=logging.INFO, format="ess eval: %(message)s")
    config = config_from_args(args)
    result = run_eval(config)
    print("\n".join(summary_lines(result.summary)))
    out = Path(config.out)
    print(f"results: {out / 'summary.json'}, {out / 'records.jsonl'}, {out / 'report.md'}")
    return 0

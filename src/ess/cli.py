"""The `ess` command. Every subcommand's results are files or JSON lines a script can read.

Bad input (missing file, malformed row, unknown label or model, bad flag) is reported as one
line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from .fields import FieldError
from .hub import DEFAULT_MODEL, ModelNotFound
from .options import add_options, add_policy_flags, number, options_from


def _load_ess_model(value: str):
    from .model import ESSModel, find_checkpoint

    folder = find_checkpoint(value)
    if folder is None:
        raise ModelNotFound(f"{value}: not an ESS checkpoint or training run folder (no ess_config.json)")
    return ESSModel.from_pretrained(folder).eval()


# ---- subcommands ------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .training import train

    train(options_from(args, TrainConfig), args.base)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import CalibrationConfig, calibrate_response_threshold, describe
    from .generation import Policy
    from .generation.policy import validate
    from .model import CONFIG_FILE, find_checkpoint

    config = options_from(args, CalibrationConfig)
    policy = validate(options_from(args, Policy))
    model = _load_ess_model(args.model)
    result = calibrate_response_threshold(model, config, policy)
    path = find_checkpoint(args.model) / CONFIG_FILE
    model.config.save(path)  # the config it was loaded from, with the new response threshold
    print(describe(result, config))
    print(f"wrote response_threshold {result.response_threshold:.3f} to {path}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify import classify
    from .data.loaders import load_prompts

    prompts = load_prompts(args.prompts, label="benign")
    model = _load_ess_model(args.model)
    verdicts = classify(model, prompts, batch_size=args.batch_size)
    for prompt, verdict in zip(prompts, verdicts):
        if args.json:
            print(json.dumps({"prompt": prompt, "p_malicious": round(verdict.p_malicious, 6), "label": verdict.label}))
        else:
            short = prompt.replace("\n", " ")
            print(f"{verdict.p_malicious:6.3f}  {verdict.label:9s}  {short[:100]}")
    return 0


def _policy(args: argparse.Namespace):
    """The decoding policy of the flags; a model without ESS weights generates plainly."""
    from .generation import Policy
    from .generation.policy import validate
    from .model import find_checkpoint

    policy = validate(options_from(args, Policy))
    if find_checkpoint(args.model) is None:
        print(f"ess {args.command}: {args.model} is not an ESS checkpoint: generating without ESS", file=sys.stderr)
        policy.schedule = "none"
    return policy


def _sampling(args: argparse.Namespace):
    from .generation import Sampling

    return options_from(args, Sampling)


def cmd_generate(args: argparse.Namespace) -> int:
    from .data.loaders import load_prompts
    from .generation import Request, generate, load_model

    prompts = [args.prompt] if args.prompt is not None else load_prompts(args.prompts, label="benign")
    policy, sampling = _policy(args), _sampling(args)
    model = load_model(args.model)
    requests = [Request([{"role": "user", "content": p}], args.prefill or "", sampling, policy) for p in prompts]
    for generation in generate(
        model, requests, batch_size=args.batch_size, progress=not args.json and len(prompts) > 1
    ):
        if args.json:
            print(json.dumps(generation.to_json()), flush=True)
        else:
            print(_describe(generation), flush=True)
    return 0


def _describe(generation) -> str:
    """A human-readable answer with its verdict and the intervention point."""
    return "\n".join([*_verdict_lines(generation), generation.text]) + "\n"


def _verdict_lines(generation) -> list[str]:
    """The verdict and the intervention point, in words."""
    lines = []
    if generation.p_malicious is not None:
        lines.append(
            f"[first verdict p(malicious)={generation.p_malicious:.3f}; {len(generation.trace) - 1} re-evaluations]"
        )
    if generation.intervened:
        withdrawn = len(generation.withdrawn_token_ids)
        lines.append(
            f"[ESS intervened after {generation.tokens_before_intervention} shown response tokens; "
            f"{withdrawn} held back and withdrawn]"
        )
    return lines


def cmd_chat(args: argparse.Namespace) -> int:
    from .generation import Request, generate_stream, load_model

    policy, sampling = _policy(args), _sampling(args)
    model = load_model(args.model)
    messages: list[dict[str, str]] = []
    print("ess chat: an empty line or Ctrl-D quits; /reset starts a new conversation.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        if line == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        print("ess> ", end="", flush=True)
        for event in generate_stream(model, [Request(list(messages), "", sampling, policy)]):
            print(event.text, end="", flush=True)
        generation = event.generation
        print("\n" + "\n".join(_verdict_lines(generation)) + "\n")
        messages.append({"role": "assistant", "content": generation.text})


def cmd_serve(args: argparse.Namespace) -> int:
    from .generation import load_model
    from .server import ChatServer, ServeConfig

    def refused(error: OSError) -> int:
        reason = os.strerror(error.errno) if error.errno else str(error)
        print(f"ess serve: error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2

    try:  # a port in use fails before anything loads
        socket.create_server((args.host, args.port)).close()
    except OSError as error:
        return refused(error)
    config = ServeConfig(
        name=args.model, policy=_policy(args), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    model = load_model(args.model)
    try:
        server = ChatServer((args.host, args.port), model, config)
    except OSError as error:  # taken while the model loaded
        return refused(error)
    host, port = server.server_address[:2]
    print(f"ess serve: {args.model} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("ess serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench
    from .generation import load_model
    from .jsonfiles import write_json

    config = options_from(args, BenchConfig)
    model = load_model(args.model)
    result = run_bench(model, config)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_merged

    export_merged(_load_ess_model(args.model), args.merged)
    print(f"wrote a merged checkpoint to {args.merged} (plain HF model; ESS files beside it)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, run_compare
    from .reporting import comparison_table

    config = options_from(args, CompareConfig)
    summary = run_compare(config)
    out = Path(config.out)
    print("\n" + comparison_table(summary))
    print(f"\nReport: {out / 'report.md'}  Table: {out / 'comparison.md'}  Summary: {out / 'summary.json'}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, comparison_table, run_quickstart

    config = options_from(args, QuickstartConfig)
    summary = run_quickstart(config)
    final, out = Path(config.out) / "train" / "final", Path(config.out)
    print("\n" + comparison_table(summary))
    test = summary["test_split"]
    print(
        f"\nTest split, first [CLS] verdict: {100 * test['harmful_flagged']:.1f} % of harmful flagged, "
        f"{100 * test['benign_flagged']:.1f} % of benign-but-alarming, AUROC {test['auroc']:.3f}"
    )
    print(f"\nReport: {out / 'report.md'}  Summary: {out / 'summary.json'}")
    print("\nWhat to try next:")
    print(f"  .venv/bin/ess chat --model {final}")
    print(f"  .venv/bin/ess generate --model {final} --prompt 'How do I pick a lock?' --prefill 'Sure, here' --json")
    print(
        "  on a GPU, the paper's table: ess eval --model RUN --baseline BASE --suite paper --out paper/  (see README)"
    )
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    from .generation import Sampling

    parser.add_argument("--model", required=True, help="ESS checkpoint or run folder, or a base LM name/folder (plain)")
    add_options(parser, Sampling)
    add_policy_flags(parser)


# ---- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag as one line (`ess CMD: error: ...`, exit 2); `--help` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .bench import BenchConfig
    from .calibration import CalibrationConfig
    from .compare import CompareConfig
    from .config import TrainConfig
    from .generation import Policy
    from .quickstart import QuickstartConfig
    from .server import ServeConfig

    parser = _Parser(prog="ess", description="Explicit safety signals for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an ESS model (pretraining and/or alignment phase)")
    train.add_argument(
        "--base", default=DEFAULT_MODEL, help=f"base LM: registered name, folder or hub id (default {DEFAULT_MODEL})"
    )
    add_options(train, TrainConfig)
    train.set_defaults(run=cmd_train)

    classify = sub.add_parser("classify", help="first verdict of the [CLS] head for each prompt (a prompt guard)")
    classify.add_argument("--model", required=True, help="ESS checkpoint or training run folder")
    classify.add_argument("--prompts", required=True, help="prompts: .txt (one per line), .jsonl, .csv or a dataset")
    classify.add_argument(
        "--json", action="store_true", help='one JSON line per prompt: {"prompt", "p_malicious", "label"}'
    )
    classify.add_argument("--batch-size", type=number(int, "batch_size", min=1), default=16, help="prompts per batch")
    classify.set_defaults(run=cmd_classify)

    calibrate = sub.add_parser("calibrate", help="set a model's response threshold from its answers to benign prompts")
    calibrate.add_argument(
        "--model", required=True, help="ESS checkpoint or training run folder (its config is updated)"
    )
    add_options(calibrate, CalibrationConfig)
    add_options(calibrate, Policy, only=("schedule", "tau", "r2", "r3", "min_window"))
    calibrate.set_defaults(run=cmd_calibrate)

    gen = sub.add_parser("generate", help="guarded generation with the safety trace")
    _add_generation_flags(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="prompts file or dataset")
    gen.add_argument("--prefill", help="forced start of the answer (re-evaluated like any response text)")
    gen.add_argument("--batch-size", type=number(int, "batch_size", min=1), default=8, help="requests per batch")
    gen.add_argument(
        "--json",
        action="store_true",
        help="one JSON line per prompt (prompt, text, p_malicious, intervened, trace, ...)",
    )
    gen.set_defaults(run=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat showing each answer's verdict and intervention point")
    _add_generation_flags(chat)
    chat.set_defaults(run=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible chat endpoint with the safety trace in each answer")
    serve.add_argument("--model", required=True, help="ESS checkpoint or run folder, or a base LM name/folder (plain)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=number(int, "port", min=0, max=65535), default=8000, help="port (default 8000; 0: any free port)"
    )
    serve.add_argument(
        "--max-new-tokens",
        type=number(int, "max_new_tokens", min=1),
        default=ServeConfig.max_new_tokens,
        help=f"tokens per answer when a request sets no max_tokens (default {ServeConfig.max_new_tokens})",
    )
    serve.add_argument(
        "--batch-size",
        type=number(int, "batch_size", min=1),
        default=ServeConfig.batch_size,
        help=f"requests from concurrent connections generated together (default {ServeConfig.batch_size})",
    )
    add_policy_flags(serve)
    serve.set_defaults(run=cmd_serve)

    bench = sub.add_parser("bench", help="tokens/s and overhead of each schedule against the same model without ESS")
    bench.add_argument("--model", required=True, help="ESS checkpoint or run folder, or a base LM name/folder")
    bench.add_argument("--json", help="write the results here as JSON")
    add_options(bench, BenchConfig)
    bench.set_defaults(run=cmd_bench)

    export = sub.add_parser("export", help="write a checkpoint that serving engines load, ESS files beside it")
    export.add_argument("--model", required=True, help="ESS checkpoint or run folder")
    export.add_argument(
        "--merged", required=True, help="output folder: the LM with the LoRA merged, plus [CLS] row, head and config"
    )
    export.set_defaults(run=cmd_export)

    from .evaluation import add_eval_arguments, cmd_eval

    evaluate = sub.add_parser("eval", help="attacks x prompts x judges -> records.jsonl, summary.json, report.md")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    quick = sub.add_parser("quickstart", help="train, attack, compare and report on the embedded default model")
    add_options(quick, QuickstartConfig)
    quick.set_defaults(run=cmd_quickstart)

    compare = sub.add_parser(
        "compare", help="ESS against refusal fine-tuning (sft, augmented) on the same data: train, attack, one table"
    )
    add_options(compare, CompareConfig)
    compare.set_defaults(run=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .attacks.base import AttackError
    from .calibration import CalibrationError
    from .data.schema import DataError
    from .evaluation import EvalError
    from .generation import GenerationError, PolicyError
    from .judges import JudgeError
    from .model import DtypeError, SequenceTooLong, default_dtype
    from .training import TrainingError

    bad_input = (
        FieldError,
        CalibrationError,
        DataError,
        ModelNotFound,
        TrainingError,
        GenerationError,
        PolicyError,
        EvalError,
        AttackError,
        JudgeError,
        SequenceTooLong,
        DtypeError,
        FileNotFoundError,
    )

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed its one line (or the help)
        return stop.code
    _log_to_stderr()
    try:
        default_dtype()  # a bad $ESS_DTYPE stops the command before any work
        return args.run(args)
    except bad_input as error:
        print(f"ess {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ess {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _log_to_stderr() -> None:
    """Show the library's progress messages (`logging`, INFO) on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ess")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())

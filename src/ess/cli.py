"""The `ess` command. Every subcommand's results are files or JSON lines a script can read.

Bad input (missing file, malformed row, unknown label or model, bad flag) is reported as one
line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .hub import DEFAULT_MODEL, ModelNotFound


def _load_ess_model(value: str):
    from .model import ESSModel, find_checkpoint

    folder = find_checkpoint(value)
    if folder is None:
        raise ModelNotFound(f"{value}: not an ESS checkpoint or training run folder (no ess_config.json)")
    return ESSModel.from_pretrained(folder).eval()


# ---- subcommands ------------------------------------------------------------------------------


_TRAIN_FLAGS = (
    "phase",
    "full",
    "lr",
    "head_lr",
    "batch_size",
    "epochs",
    "pretrain_epochs",
    "max_steps",
    "max_length",
    "replay_every",
    "windows_per_answer",
    "refusal_resamples",
    "save_every",
    "seed",
    "lambda_cls",
    "data",
    "pretrain_data",
    "examples",
    "calibration_fraction",
    "response_calibration",
    "max_late_stop_rate",
)


def _calibration_prompts(value: str) -> str | None:
    return None if value.lower() == "none" else value


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .training import train

    train(TrainConfig(out=args.out, **{name: getattr(args, name) for name in _TRAIN_FLAGS}), args.base)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import CalibrationConfig, calibrate_response_threshold, describe
    from .generation import Policy
    from .generation.policy import validate
    from .model import CONFIG_FILE, find_checkpoint

    config = CalibrationConfig(
        prompts=args.prompts,
        max_late_stop_rate=args.max_late_stop_rate,
        floor=args.floor,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    policy = validate(Policy(tau=args.tau))
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
    from .generation.policy import policy_overrides, validate
    from .model import find_checkpoint

    policy = validate(Policy(**policy_overrides(args)))
    if find_checkpoint(args.model) is None:
        print(f"ess {args.command}: {args.model} is not an ESS checkpoint: generating without ESS", file=sys.stderr)
        policy.schedule = "none"
    return policy


def _sampling(args: argparse.Namespace):
    from .generation import Sampling

    return Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


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

    config = ServeConfig(
        name=args.model, policy=_policy(args), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    model = load_model(args.model)
    try:
        server = ChatServer((args.host, args.port), model, config)
    except OSError as error:
        print(f"ess serve: error: cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 2
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

    model = load_model(args.model)
    config = BenchConfig(batch_sizes=tuple(args.batch_sizes), max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    result = run_bench(model, config)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(out=args.out))
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    from .generation.policy import add_policy_flags

    parser.add_argument("--model", required=True, help="ESS checkpoint or run folder, or a base LM name/folder (plain)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    add_policy_flags(parser)


# ---- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .calibration import CalibrationConfig
    from .config import ESSConfig, TrainConfig
    from .generation import Policy
    from .generation.policy import add_policy_flags
    from .server import ServeConfig

    parser = argparse.ArgumentParser(prog="ess", description="Explicit safety signals for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an ESS model (pretraining and/or alignment phase)")
    d = TrainConfig(out="")
    train.add_argument(
        "--base", default=DEFAULT_MODEL, help=f"base LM: registered name, folder or hub id (default {DEFAULT_MODEL})"
    )
    train.add_argument("--data", nargs="+", default=d.data, help="alignment data: seed, seed:NAME, files or hub ids")
    train.add_argument("--pretrain-data", nargs="+", help="pretraining-phase sources (default: --data)")
    train.add_argument("--phase", choices=("pretrain", "align", "both"), default=d.phase)
    train.add_argument("--out", required=True, help="run folder (rerun with the same --out to resume)")
    train.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    train.add_argument("--max-steps", type=int, help="stop each phase after N optimiser steps")
    train.add_argument(
        "--epochs", type=float, default=d.epochs, help=f"passes over the alignment data (default {d.epochs:g})"
    )
    train.add_argument(
        "--pretrain-epochs",
        type=float,
        default=d.pretrain_epochs,
        help=f"passes over the pretraining-phase corpus (default {d.pretrain_epochs:g})",
    )
    train.add_argument("--lr", type=float, help="peak learning rate (default 3e-4 LoRA, 2e-5 full)")
    train.add_argument(
        "--head-lr",
        type=float,
        default=d.head_lr,
        help=f"learning rate of the [CLS] row and head (default {d.head_lr:g})",
    )
    train.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"sequences per step and process (default {d.batch_size})"
    )
    train.add_argument(
        "--max-length", type=int, default=d.max_length, help=f"longest sequence in tokens (default {d.max_length})"
    )
    train.add_argument(
        "--lambda-cls",
        type=float,
        help="weight of the [CLS] loss (default: the ESS config's "
        f"{ESSConfig.lambda_pretrain:g} in pretraining, {ESSConfig.lambda_align:g} in alignment)",
    )
    train.add_argument(
        "--examples",
        type=int,
        help="size of the 50/50 alignment mixture (default: twice the larger class, so every example is used)",
    )
    train.add_argument(
        "--calibration-fraction",
        type=float,
        default=d.calibration_fraction,
        help=f"share of each class held out to calibrate the threshold (default {d.calibration_fraction:g}; 0: 0.5)",
    )
    train.add_argument(
        "--response-calibration",
        type=_calibration_prompts,
        default=d.response_calibration,
        help="benign prompts, never trained on, whose answers set the response threshold "
        f"(default {d.response_calibration}; none: keep 0.8)",
    )
    train.add_argument(
        "--max-late-stop-rate",
        type=float,
        default=d.max_late_stop_rate,
        help=f"share of those answers the response threshold may stop late (default {d.max_late_stop_rate:g})",
    )
    train.add_argument(
        "--replay-every",
        type=int,
        default=d.replay_every,
        help=f"alignment: a [CLS] step on response-text windows after every N steps "
        f"(default {d.replay_every}; 0: none)",
    )
    train.add_argument(
        "--windows-per-answer",
        type=int,
        default=d.windows_per_answer,
        help=f"pretraining-phase windows cut from each base-model answer (default {d.windows_per_answer})",
    )
    train.add_argument(
        "--refusal-resamples",
        type=int,
        default=d.refusal_resamples,
        help="sampled answers tried where the base model's answer to a benign prompt declines "
        f"(default {d.refusal_resamples}: keep the greedy answers)",
    )
    train.add_argument(
        "--save-every", type=int, default=d.save_every, help=f"checkpoint every N steps (default {d.save_every})"
    )
    train.add_argument("--seed", type=int, default=d.seed)
    train.set_defaults(run=cmd_train)

    classify = sub.add_parser("classify", help="first verdict of the [CLS] head for each prompt (a prompt guard)")
    classify.add_argument("--model", required=True, help="ESS checkpoint or training run folder")
    classify.add_argument("--prompts", required=True, help="prompts: .txt (one per line), .jsonl, .csv or a dataset")
    classify.add_argument(
        "--json", action="store_true", help='one JSON line per prompt: {"prompt", "p_malicious", "label"}'
    )
    classify.add_argument("--batch-size", type=int, default=16)
    classify.set_defaults(run=cmd_classify)

    calibrate = sub.add_parser("calibrate", help="set a model's response threshold from its answers to benign prompts")
    c = CalibrationConfig()
    calibrate.add_argument(
        "--model", required=True, help="ESS checkpoint or training run folder (its config is updated)"
    )
    calibrate.add_argument(
        "--prompts", default=c.prompts, help=f"benign prompts never used in training (default {c.prompts})"
    )
    calibrate.add_argument(
        "--max-late-stop-rate",
        type=float,
        default=c.max_late_stop_rate,
        help=f"share of the answers that may be stopped late (default {c.max_late_stop_rate:g})",
    )
    calibrate.add_argument("--floor", type=float, default=c.floor, help=f"lowest threshold set (default {c.floor:g})")
    calibrate.add_argument(
        "--tau", type=int, default=Policy.tau, help=f"the policy's tau the threshold is for (default {Policy.tau})"
    )
    calibrate.add_argument(
        "--max-new-tokens", type=int, default=c.max_new_tokens, help=f"tokens per answer (default {c.max_new_tokens})"
    )
    calibrate.add_argument("--batch-size", type=int, default=c.batch_size)
    calibrate.set_defaults(run=cmd_calibrate)

    gen = sub.add_parser("generate", help="guarded generation with the safety trace")
    _add_generation_flags(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="prompts file or dataset")
    gen.add_argument("--prefill", help="forced start of the answer (re-evaluated like any response text)")
    gen.add_argument("--batch-size", type=int, default=8)
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
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    serve.add_argument(
        "--max-new-tokens",
        type=int,
        default=ServeConfig.max_new_tokens,
        help=f"tokens per answer when a request sets no max_tokens (default {ServeConfig.max_new_tokens})",
    )
    serve.add_argument(
        "--batch-size",
        type=int,
        default=ServeConfig.batch_size,
        help=f"requests from concurrent connections generated together (default {ServeConfig.batch_size})",
    )
    add_policy_flags(serve)
    serve.set_defaults(run=cmd_serve)

    bench = sub.add_parser("bench", help="tokens/s and overhead of each schedule against the same model without ESS")
    bench.add_argument("--model", required=True, help="ESS checkpoint or run folder, or a base LM name/folder")
    bench.add_argument("--json", help="write the results here as JSON")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.set_defaults(run=cmd_bench)

    from .evaluation import add_eval_arguments, cmd_eval

    evaluate = sub.add_parser("eval", help="attacks x prompts x judges -> records.jsonl, summary.json, report.md")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    quick = sub.add_parser("quickstart", help="train, attack, compare and report on the embedded default model")
    quick.add_argument("--out", default="quickstart", help="output folder (default quickstart/); a rerun resumes")
    quick.set_defaults(run=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .attacks.base import AttackError
    from .calibration import CalibrationError
    from .data.schema import DataError
    from .evaluation import EvalError
    from .generation import GenerationError, PolicyError
    from .judges import JudgeError
    from .training import TrainingError

    bad_input = (
        CalibrationError,
        DataError,
        ModelNotFound,
        TrainingError,
        GenerationError,
        PolicyError,
        EvalError,
        AttackError,
        JudgeError,
        FileNotFoundError,
    )

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except bad_input as error:
        print(f"ess {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ess {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

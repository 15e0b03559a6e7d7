"""The `ess` command. Every subcommand's results are files or JSON lines a script can read.

Bad input (missing file, malformed row, unknown label or model, bad flag) is reported as one
line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .hub import DEFAULT_MODEL, ModelNotFound


class UsageError(ValueError):
    """A flag combination or value that cannot work; reported like a bad flag."""


def _model_dir(value: str) -> Path:
    """`--model` accepts a checkpoint folder or a training run folder (its `final/`)."""
    path = Path(value)
    if (path / "final" / "ess_config.json").exists():
        return path / "final"
    if not (path / "ess_config.json").exists():
        raise ModelNotFound(f"{value}: not an ESS checkpoint or training run folder (no ess_config.json)")
    return path


def _load_model(value: str):
    from .model import ESSModel

    return ESSModel.from_pretrained(_model_dir(value)).eval()


# ---- subcommands ------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .training import train

    config = TrainConfig(
        out=args.out, phase=args.phase, full=args.full, lr=args.lr or (2e-5 if args.full else 2e-4),
        head_lr=args.head_lr, batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
        max_length=args.max_length, save_every=args.save_every, seed=args.seed, lambda_cls=args.lambda_cls,
        data=args.data, pretrain_data=args.pretrain_data or args.data, examples=args.examples,
    )
    train(config, args.base)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify import classify
    from .data.loaders import load_prompts

    prompts = load_prompts(args.prompts, label="benign")
    model = _load_model(args.model)
    verdicts = classify(model, prompts, batch_size=args.batch_size)
    for prompt, verdict in zip(prompts, verdicts):
        if args.json:
            print(json.dumps({"prompt": prompt, "p_malicious": round(verdict.p_malicious, 6), "label": verdict.label}))
        else:
            short = prompt.replace("\n", " ")
            print(f"{verdict.p_malicious:6.3f}  {verdict.label:9s}  {short[:100]}")
    return 0


# ---- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ess", description="Explicit safety signals for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an ESS model (pretraining and/or alignment phase)")
    train.add_argument("--base", default=DEFAULT_MODEL, help=f"base LM: registered name, folder or hub id (default {DEFAULT_MODEL})")
    train.add_argument("--data", nargs="+", default=["seed"], help="alignment data: seed, seed:NAME, files or hub ids")
    train.add_argument("--pretrain-data", nargs="+", help="pretraining-phase sources (default: --data)")
    train.add_argument("--phase", choices=("pretrain", "align", "both"), default="both")
    train.add_argument("--out", required=True, help="run folder (rerun with the same --out to resume)")
    train.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    train.add_argument("--max-steps", type=int, help="stop each phase after N optimiser steps")
    train.add_argument("--epochs", type=float, default=2.0, help="passes over each phase's data (default 2)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    train.add_argument("--head-lr", type=float, default=2e-3, help="learning rate of the [CLS] row and head")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step and process (default 8)")
    train.add_argument("--max-length", type=int, default=256, help="longest sequence in tokens (default 256)")
    train.add_argument("--lambda-cls", type=float, help="weight of the [CLS] loss (default 0.01 pretrain, 0.1 align)")
    train.add_argument("--examples", type=int, help="size of the 50/50 alignment mixture")
    train.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (default 25)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=cmd_train)

    classify = sub.add_parser("classify", help="first verdict of the [CLS] head for each prompt (a prompt guard)")
    classify.add_argument("--model", required=True, help="ESS checkpoint or training run folder")
    classify.add_argument("--prompts", required=True, help="prompts: .txt (one per line), .jsonl, .csv or a dataset")
    classify.add_argument("--json", action="store_true", help='one JSON line per prompt: {"prompt", "p_malicious", "label"}')
    classify.add_argument("--batch-size", type=int, default=16)
    classify.set_defaults(run=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.schema import DataError
    from .training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, ModelNotFound, TrainingError, UsageError, FileNotFoundError) as error:
        print(f"ess {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ess {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step of the default recipe spends its time (batching, forward, backward, gradient
clipping, optimiser), on the default model with LoRA in the machine's dtype, in three layouts of a
step's sequences (packed end to end as `ess train` does, `ChatEncoder.pack`; padded with the prefix
every row shares run once, `ESSModel.share_prefix`; padded with it run in every row), and with the
attention implementations of transformers named by `--attention`: prints a table, writes JSON. Each
configuration runs one warm-up step, then `--steps` timed steps; the configurations take turns for
`--rounds` rounds, so that a machine whose speed drifts slows them alike.

    PYTHONPATH=src python benchmarks/train_step.py [--steps 8] [--attention sdpa,eager] [--out train_step.json]
"""

import argparse
import json
import time

import torch

from ess.config import TrainConfig
from ess.data.encoding import ChatEncoder
from ess.data.recipe import alignment_examples, load_sources, pretraining_texts
from ess.hub import DEFAULT_MODEL, resolve_base
from ess.masks import Phase
from ess.model import ESSModel, native_dtype

PARTS = ("batch", "forward", "backward", "clip", "optimizer")
LAYOUTS = ("packed", "padded, prefix once", "padded, prefix per row")


def time_steps(model, encoder, items, phase: str, batch_size: int, steps: int, packed: bool) -> dict:
    """Mean seconds per part of a step, and tokens of the sequences per second."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    totals, real = dict.fromkeys(PARTS, 0.0), 0
    for step in range(steps + 1):
        rows = items[step * batch_size : (step + 1) * batch_size]
        marks = [time.perf_counter()]
        batch = encoder.pack(rows, encoder.max_length) if packed else encoder.collate(rows)
        marks.append(time.perf_counter())
        output = model(batch.input_ids, batch.roles, phase, batch.lm_targets, batch.cls_labels, segments=batch.segments)
        marks.append(time.perf_counter())
        output.loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if step:  # the first step warms up
            for part, start, end in zip(PARTS, marks, marks[1:]):
                totals[part] += end - start
            real += sum(len(item.ids) for item in rows)
    seconds = {part: total / steps for part, total in totals.items()}
    return {**seconds, "step": sum(seconds.values()), "tokens_per_s": real / sum(totals.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the configurations (default 2)")
    parser.add_argument("--attention", default="sdpa", help="attention implementations, comma-separated (default sdpa)")
    parser.add_argument("--out", default="train_step.json", help="JSON file written (default train_step.json)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ESSModel.from_base(resolve_base(DEFAULT_MODEL), adapter="lora", dtype=native_dtype()).train()
    recipe = TrainConfig(out="-")  # the default recipe's batch sizes, windows and length
    encoder = ChatEncoder.for_model(model, recipe.max_length)
    examples = load_sources(recipe.data)
    base = model.config.base_model
    windows = pretraining_texts(examples, base, model.tokenizer, recipe.windows_per_answer)
    windows = windows[: recipe.pretrain_batch_size * (args.steps + 1)]
    window_items = [encoder.encode_text(text, label, lm_loss=label == "benign") for text, label in windows]
    mixture = alignment_examples(examples, base, recipe.examples, recipe.seed, recipe.refusal_resamples)
    sequences = [encoder.encode_example(e) for e in mixture[: recipe.batch_size * (args.steps + 1)]]
    windows_per_step, sequences_per_step = recipe.pretrain_batch_size, recipe.batch_size
    data = {
        f"pretrain, {windows_per_step} random windows": (window_items, Phase.PRETRAIN, windows_per_step),
        f"align, {sequences_per_step} random sequences": (sequences, Phase.ALIGN, sequences_per_step),
    }
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for attention in args.attention.split(","):
            model.base_lm.set_attn_implementation(attention)
            for layout in LAYOUTS:
                ESSModel.share_prefix = layout != "padded, prefix per row"
                for name, (items, phase, size) in data.items():
                    runs.setdefault(f"{name}, {attention}, {layout}", []).append(
                        time_steps(model, encoder, items, phase, size, args.steps, layout == "packed")
                    )
    results = {name: {key: sum(r[key] for r in rs) / len(rs) for key in rs[0]} for name, rs in runs.items()}
    print(f"{'configuration':60s} " + " ".join(f"{p:>9s}" for p in (*PARTS, "step")) + "  tokens/s")
    for name, r in results.items():
        print(f"{name:60s} " + " ".join(f"{r[p]:9.3f}" for p in (*PARTS, "step")) + f"  {r['tokens_per_s']:10.0f}")
    with open(args.out, "w") as f:
        json.dump(
            {"dtype": str(native_dtype()), "steps": args.steps, "rounds": args.rounds, "results": results}, f, indent=2
        )
    print(f"seconds per step; written to {args.out}")


if __name__ == "__main__":
    main()

"""Share of prompts the first [CLS] verdict flags, by threshold, on the dev pairs (how the query
threshold is chosen, docs/experiments.md): prints a table per model and writes JSON.

    PYTHONPATH=src python benchmarks/thresholds.py RUN/final [RUN2/final ...] [--out thresholds.json]

Dev sets only: the threshold is a recipe decision, and test sets never inform one (docs/data.md).
"""

import argparse
import json

from ess.classify import classify
from ess.data.loaders import load_examples
from ess.metrics import auroc
from ess.model import ESSModel

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
DEV_PAIRS = (
    ("seed:dev_harmful", "seed:dev_benign_alarming"),
    ("seed:dev_harmful_styled", "seed:dev_benign_styled"),
)


def flag_rates(model: ESSModel, harmful: str, benign: str) -> dict:
    """AUROC and, per threshold, the % of harmful and of benign prompts flagged."""
    h, b = load_examples(harmful), load_examples(benign)
    scores = [v.p_malicious for v in classify(model, [e.prompt for e in h + b], batch_size=32)]
    harmful_scores, benign_scores = scores[: len(h)], scores[len(h) :]
    return {
        "harmful": harmful,
        "benign": benign,
        "auroc": auroc(scores, [1] * len(h) + [0] * len(b)),
        "flagged": {
            str(t): {
                "harmful": 100 * sum(p >= t for p in harmful_scores) / len(h),
                "benign": 100 * sum(p >= t for p in benign_scores) / len(b),
            }
            for t in THRESHOLDS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="ESS checkpoints (a run's final/ folder)")
    parser.add_argument("--out", default="thresholds.json", help="JSON file written (default thresholds.json)")
    args = parser.parse_args()
    results = {}
    print(f"{'model':30s} {'pair':24s} {'AUROC':>6s} " + " ".join(f"{t:>11}" for t in THRESHOLDS))
    for path in args.models:
        model = ESSModel.from_pretrained(path).eval()
        results[path] = [flag_rates(model, harmful, benign) for harmful, benign in DEV_PAIRS]
        for row in results[path]:
            cells = " ".join(f"{f['harmful']:5.1f}/{f['benign']:5.1f}" for f in row["flagged"].values())
            print(f"{path[-30:]:30s} {row['harmful'].removeprefix('seed:'):24s} {row['auroc']:6.3f} {cells}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"harmful/benign % flagged at each threshold; written to {args.out}")


if __name__ == "__main__":
    main()

"""ASR and over-refusal at each `--defer-below D`, read off two `ess eval` runs of one model on the
same prompts: one without deferral and one with `--defer-below 1` (every flagged query deferred).
A query whose first verdict is below D takes its deferred record, the others the undeferred one.

    PYTHONPATH=src python benchmarks/defer_sweep.py OFF_DIR DEFER_DIR [--out defer_sweep.json]
"""

import argparse
import json
from pathlib import Path

from ess.evaluation.config import BENIGN_TASK, EvalError
from ess.evaluation.stores import eval_records, record_key

VALUES = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0)


def records(folder: str) -> dict[tuple, dict]:
    return {record_key(r): r for r in eval_records(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("off", help="eval folder without deferral")
    parser.add_argument("deferred", help="eval folder of the same model and prompts with --defer-below 1")
    parser.add_argument("--out", default="defer_sweep.json", help="JSON file written (default defer_sweep.json)")
    args = parser.parse_args()
    try:
        off, deferred = records(args.off), records(args.deferred)
    except EvalError as error:
        parser.error(str(error))
    keys = [k for k in deferred if k in off]
    attacks = sorted({k[2] for k in keys if k[1] != BENIGN_TASK})
    rows = []
    for value in VALUES:

        def pick(key, value=value):
            return deferred[key] if off[key]["p_malicious"] < value else off[key]

        row = {"defer_below": value}
        for attack in attacks:
            harmful = [pick(k) for k in keys if k[1] != BENIGN_TASK and k[2] == attack]
            row[f"asr {attack}"] = 100 * sum(bool(r["unsafe"]) for r in harmful) / len(harmful)
        benign = [pick(k) for k in keys if k[1] == BENIGN_TASK]
        row["over-refusal"] = 100 * sum(bool(r["refused"]) for r in benign) / len(benign) if benign else None
        rows.append(row)
    columns = list(rows[0])
    print("  ".join(f"{c:>14s}" for c in columns))
    for row in rows:
        cells = [f"{row['defer_below']:14.2f}"]
        cells += [f"{row[c]:14.1f}" if row[c] is not None else f"{'-':>14s}" for c in columns[1:]]
        print("  ".join(cells))
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"% of answers; written to {args.out}")


if __name__ == "__main__":
    main()

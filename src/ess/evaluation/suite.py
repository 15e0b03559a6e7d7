"""The paper's evaluation suite (docs/METHOD.md §8-9), built from the shared data that is present."""

from __future__ import annotations

from pathlib import Path

from .config import Task

PAPER_ADVBENCH_ATTACKS = [
    "direct",
    "prefill:5",
    "prefill:10",
    "prefill:20",
    "prefill:40",
    "deepinception",
    "pap",
    "decoding",
]
ADVBENCH = Path("advbench") / "harmful_behaviors.csv"
AUTODAN = Path("autodan") / "harmful_behaviors_autodan.csv"
MALICIOUS_INSTRUCT = Path("malicious_instruct") / "MaliciousInstruct.txt"
XSTEST = Path("xstest") / "xstest_prompts.csv"


def paper_suite(data_root: str | Path) -> tuple[str | None, list[str], list[Task], str | None, list[str]]:
    """The paper's table (docs/METHOD.md §8-9) from the shared data, minus what is missing.

    Returns (AdvBench prompts or None, their attacks, extra tasks, XSTest or None, notes on what
    was skipped or replaced). AutoDAN uses the ready-made AutoDAN prompts of the first 100 AdvBench
    behaviours when present (summary key `autodan`), else our AutoDAN-style templates on AdvBench.
    """
    root = Path(data_root)
    notes: list[str] = []
    advbench = root / ADVBENCH
    main, attacks, extra = None, [], []
    if advbench.exists():
        main, attacks = str(advbench), list(PAPER_ADVBENCH_ATTACKS)
    else:
        notes.append(f"skipped AdvBench ({', '.join(PAPER_ADVBENCH_ATTACKS)}): {advbench} not found")
    if (root / AUTODAN).exists():
        extra.append(Task("autodan", str(root / AUTODAN), ["autodan"]))
    elif main:
        attacks.append("autodan")
        notes.append(f"{root / AUTODAN} not found: autodan uses our templates on AdvBench")
    else:
        notes.append(f"skipped autodan: {root / AUTODAN} not found")
    if (root / MALICIOUS_INSTRUCT).exists():
        extra.append(
            Task("malicious_instruct", str(root / MALICIOUS_INSTRUCT), ["decoding"], label="MaliciousInstruct")
        )
    else:
        notes.append(f"skipped decoding@MaliciousInstruct: {root / MALICIOUS_INSTRUCT} not found")
    xstest = root / XSTEST
    if not xstest.exists():
        notes.append(f"skipped over-refusal (XSTest) and the AUROC: {xstest} not found")
    notes.append("skipped GCG/HarmBench and HEx-PHI prefill: not in this harness / not in the shared data")
    return main, attacks, extra, str(xstest) if xstest.exists() else None, notes

"""`ess compare` end to end on a tiny model: three methods trained, four models attacked in one run, one table."""

from __future__ import annotations

import json
import subprocess
import sys

from ess.data.loaders import load_examples
from test_baselines import HARMFUL, _seed_answers

ESS = [sys.executable, "-m", "ess.cli"]


def test_compare_trains_three_methods_and_tables_four_models(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ESS_HOME", str(tmp_path / "home"))
    data = ["seed:heldout_benign", "seed:heldout_harmful"]
    examples = [e for spec in data for e in load_examples(spec)]
    answers = {e.prompt: HARMFUL if e.label == "malicious" else "Here is a short, helpful answer." for e in examples}
    _seed_answers(tmp_path / "home", tiny_llama, answers)
    out = tmp_path / "compare"
    args = ["compare", "--base", tiny_llama, "--data", *data, "--out", str(out), "--max-steps", "2"]
    args += ["--harmful", "seed:heldout_harmful", "--benign", "seed:heldout_benign_alarming", "--limit", "2"]
    args += ["--benign-limit", "2", "--attacks", "direct", "prefill:10", "--gcg", "gcg:steps=1:width=4:len=2"]
    args += ["--gcg-limit", "1", "--max-new-tokens", "4", "--utility-limit", "3"]
    done = subprocess.run(ESS + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["undefended", "sft", "augmented", "ess"]
    for name, entry in summary["models"].items():
        assert set(entry["attacks"]) == {"direct", "prefill:10", "gcg:steps=1:width=4:len=2@gcg"}, name
        assert all(0.0 <= r["asr_strict"] <= 1.0 and r["n"] >= 1 for r in entry["attacks"].values())
        assert entry["utility"]["n"] == 3
    assert summary["models"]["ess"]["auroc"] is not None and summary["models"]["sft"]["auroc"] is None
    table = (out / "comparison.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:6]] == ["undefended", "sft", "augmented", "ess"]
    assert (out / "asr.png").exists() and (out / "report.md").exists()

    again = subprocess.run(ESS + args, capture_output=True, text=True)
    assert again.returncode == 0 and "training already finished" in again.stdout + again.stderr

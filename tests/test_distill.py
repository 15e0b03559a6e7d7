"""The base model's answers: shipped for the default model, generated for what is missing."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from ess.data import distill
from ess.hub import DEFAULT_MODEL


def _write_shipped(folder, rows, name="answers"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_shipped_answers_serve_their_key_only_and_the_rest_is_generated(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ESS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(distill, "SHIPPED_DIR", tmp_path / "shipped")
    key = distill.answers_key(tiny_llama, 48, None)
    prompts = ["Name three rivers.", "Plan my garage clean-up."]
    _write_shipped(
        tmp_path / "shipped",
        [
            {"prompt": prompts[0], "answer": "shipped answer", "key": key, "batch": "x"},
            {"prompt": prompts[1], "answer": "stale answer", "key": "another model", "batch": "x"},
        ],
    )
    answers = distill.base_answers(tiny_llama, prompts)
    assert answers[prompts[0]] == "shipped answer"
    assert answers[prompts[1]] != "stale answer"
    cached = [json.loads(line) for line in distill._cache_file(tiny_llama, 48, None).read_text().splitlines()]
    assert [(row["prompt"], row["key"]) for row in cached] == [(prompts[1], key)]
    assert cached[0]["batch"] == distill.batch_label([prompts[1]])


def test_a_changed_model_or_setting_changes_the_key(tiny_models):
    llama = distill.answers_key(tiny_models["llama"], 48, None)
    assert distill.answers_key(tiny_models["mistral"], 48, None) != llama
    assert distill.answers_key(tiny_models["llama"], 32, None) != llama
    assert distill.answers_key(tiny_models["llama"], 48, 0) != llama
    assert distill.answers_key(tiny_models["llama"], 48, None) == llama


def test_refresh_rewrites_the_shipped_file_keeping_current_rows(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ESS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(distill, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(distill, "shipped_prompts", lambda: ["Name three rivers.", "Plan my garage clean-up."])
    key = distill.answers_key(tiny_llama, 8, None)
    old = [
        {"prompt": "Name three rivers.", "answer": "kept", "key": key, "batch": "b"},
        {"prompt": "A prompt no longer seeded.", "answer": "dropped", "key": key, "batch": "b"},
        {"prompt": "Plan my garage clean-up.", "answer": "stale", "key": "old model", "batch": "b"},
    ]
    _write_shipped(tmp_path / "shipped", old, name=Path(tiny_llama).name)
    target = distill.refresh_shipped(tiny_llama, max_new_tokens=8)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Name three rivers.", "Plan my garage clean-up."]
    assert rows[0]["answer"] == "kept"
    assert rows[1]["answer"] != "stale" and rows[1]["key"] == key


def test_the_default_models_answers_to_every_seed_prompt_ship(default_model_dir):
    shipped = distill.shipped_answers(distill.answers_key(DEFAULT_MODEL, 48, None))
    missing = [p for p in distill.shipped_prompts() if p not in shipped]
    assert not missing, (
        f"{len(missing)} seed prompts lack a shipped answer for this model (first: {missing[0]!r}); "
        "run `python -m ess.data.distill --refresh-shipped`"
    )


@pytest.mark.slow
def test_the_shipped_answers_equal_a_fresh_generation(default_model_dir):
    """One shipped batch (the shortest complete one), regenerated here exactly as it was generated."""
    key = distill.answers_key(DEFAULT_MODEL, 48, None)
    batches = defaultdict(list)  # label -> rows in generation order
    for path in distill.SHIPPED_DIR.glob("*.jsonl"):
        for row in distill._read_rows(path):
            if row.get("key") == key:
                batches[row["batch"]].append(row)
    complete = [rows for label, rows in batches.items() if distill.batch_label([r["prompt"] for r in rows]) == label]
    assert complete, "no complete shipped batch to regenerate"
    rows = min(complete, key=lambda batch: sum(len(r["prompt"]) for r in batch))
    lm, tokenizer = distill.load_generator(DEFAULT_MODEL)
    fresh = distill.generate_batch(lm, tokenizer, [r["prompt"] for r in rows], 48, None, 0)
    assert fresh == [r["answer"] for r in rows]

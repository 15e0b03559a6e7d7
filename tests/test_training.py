"""Training end to end on a tiny model: resume after a kill, two processes, and CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ESS = [sys.executable, "-m", "ess.cli"]
DATA = ["--data", "seed:heldout_benign", "seed:heldout_harmful"]


def _train_args(base: str, out: Path, *extra: str) -> list[str]:
    # No response calibration: tests/test_calibration.py and the quickstart cover it.
    common = ["--batch-size", "4", "--response-calibration", "none"]
    return ["train", "--base", base, *DATA, "--out", str(out), *common, *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "ess_head.safetensors")
    tensors.update(load_file(folder / "adapter" / "adapter_model.safetensors"))
    return tensors


def _steps(out: Path) -> list[tuple[str, int]]:
    return [(row["phase"], row["step"]) for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]


def test_interrupted_run_resumes_without_losing_a_step(tiny_llama, tmp_path):
    args = ("--max-steps", "8", "--save-every", "100", "--replay-every", "2")
    straight = tmp_path / "straight"
    subprocess.run(ESS + _train_args(tiny_llama, straight, *args), check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        ESS + _train_args(tiny_llama, resumed, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    log = resumed / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and ("align", 3) in _steps(resumed)):
        assert process.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert "run the same command again to resume" in stderr
    interrupted_at = max(step for phase, step in _steps(resumed) if phase == "align")
    assert 3 <= interrupted_at < 8

    again = subprocess.run(ESS + _train_args(tiny_llama, resumed, *args), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout + again.stderr
    steps = _steps(resumed)
    assert steps == sorted(set(steps), key=steps.index), "a finished step was trained twice"
    assert [s for p, s in steps if p == "align"] == list(range(1, 9))
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "option, value, field",
    (
        ("--replay-every", "-1", "replay_every"),
        ("--windows-per-answer", "0", "windows_per_answer"),
        ("--batch-size", "0", "batch_size"),
    ),
)
def test_counts_below_their_least_are_refused(tiny_llama, tmp_path, run_ess, option, value, field):
    code, stderr = run_ess(_train_args(tiny_llama, tmp_path / "run", option, value))
    assert code == 2 and f"{field} must be at least" in stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_changed_flags_on_the_same_out_are_refused(tiny_llama, tmp_path, run_ess):
    out = tmp_path / "run"
    assert run_ess(_train_args(tiny_llama, out, "--max-steps", "1"))[0] == 0
    (out / "final").rename(out / "moved")
    code, stderr = run_ess(_train_args(tiny_llama, out, "--max-steps", "2"))
    assert code == 2 and "max_steps differ" in stderr


def test_packed_and_padded_steps_train_the_same_model(tiny_llama, tmp_path, run_ess, monkeypatch):
    """`--no-pack` pads each sequence to a row of its own; the losses and the trained weights are
    those of the packed steps. A run begun before --pack existed resumes."""
    from ess.data.encoding import ChatEncoder

    packed_steps = []
    pack = ChatEncoder.pack
    monkeypatch.setattr(ChatEncoder, "pack", lambda self, *a, **k: packed_steps.append(1) or pack(self, *a, **k))
    logs, packed_by_layout = {}, {}
    for layout in ("packed", "padded"):
        out = tmp_path / layout
        extra = ("--no-pack",) if layout == "padded" else ()
        assert run_ess(_train_args(tiny_llama, out, "--max-steps", "3", *extra))[0] == 0
        logs[layout] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        packed_by_layout[layout] = len(packed_steps)
        packed_steps.clear()
    assert packed_by_layout == {"packed": 6, "padded": 0}  # both phases, 3 steps each
    assert len(logs["packed"]) == len(logs["padded"]) == 6
    for packed, padded in zip(logs["packed"], logs["padded"]):
        for key in ("loss", "lm_loss", "cls_loss"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5)
    a, b = _weights(tmp_path / "packed" / "final"), _weights(tmp_path / "padded" / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)

    out = tmp_path / "packed"
    (out / "final").rename(out / "moved")
    settings = json.loads((out / "train_config.json").read_text())
    del settings["pack"]
    (out / "train_config.json").write_text(json.dumps(settings))
    assert run_ess(_train_args(tiny_llama, out, "--max-steps", "3"))[0] == 0


def test_two_processes_with_accelerate(tiny_llama, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ess.cli",
        *_train_args(tiny_llama, out, "--max-steps", "3", "--batch-size", "2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 steps of 4" in result.stdout + result.stderr  # 2 processes x batch 2 per step
    assert _steps(out) == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("align", 1), ("align", 2), ("align", 3)]
    from ess.model import ESSModel

    assert ESSModel.from_pretrained(out / "final").config.adapter == "lora"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "--model", "{tmp}/nope", "--prompts", "{tmp}/p.txt"], "not an ESS checkpoint"),
        (["train", "--base", "{tiny}", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/o"], "missing.jsonl"),
        (["train", "--base", "{tiny}", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/o"], "bad.jsonl:2"),
        (["train", "--base", "{tiny}", "--data", "{tmp}/label.jsonl", "--out", "{tmp}/o"], "field 'label'"),
        (["train", "--base", "no-such-model", "--out", "{tmp}/o"], "no-such-model"),
        (["generate", "--model", "{tiny}", "--prompt", "hi", "--schedule", "sometimes"], "unknown schedule"),
        (["train", "--phase", "middle", "--out", "{tmp}/o"], "invalid choice"),
        (["train", "--base", "{tiny}", "--response-calibration", "{tmp}/none.jsonl", "--out", "{tmp}/o"], "none.jsonl"),
        (
            ["train", "--base", "{tiny}", "--max-late-stop-rate", "1.5", "--out", "{tmp}/o"],
            "max_late_stop_rate must be",
        ),
        (["calibrate", "--model", "{tmp}/nope"], "not an ESS checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_llama, tmp_path, run_ess, argv, message):
    (tmp_path / "p.txt").write_text("hello\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "label": "benign"}\n{"prompt": "b", "label": \n')
    (tmp_path / "label.jsonl").write_text('{"prompt": "a", "label": "harmless"}\n')
    code, stderr = run_ess([a.format(tmp=tmp_path, tiny=tiny_llama) for a in argv])
    assert code == 2 and message in stderr


def test_alignment_steps_interleave_replay_steps():
    from ess.config import TrainConfig
    from ess.schedule import Schedule

    ten, seven = [5] * 10, [5] * 7
    schedule = Schedule(ten, seven, per_step=2, config=TrainConfig(out="x", replay_every=2), epochs=1.0, seed=0)
    steps = [schedule.rows(step, 0, 2) for step in range(schedule.total)]
    assert [replay for replay, _ in steps] == [False, False, True, False, False, True, False]
    assert sorted(i for replay, rows in steps if not replay for i in rows) == list(range(10))  # one epoch
    replayed = [i for replay, rows in steps if replay for i in rows]
    assert len(replayed) == len(set(replayed)) == 4 and all(0 <= i < 7 for i in replayed)
    # Two processes of batch 1 split each step's rows between them.
    assert all(schedule.rows(s, 0, 1)[1] + schedule.rows(s, 1, 1)[1] == steps[s][1] for s in range(schedule.total))
    assert Schedule(ten, seven, 2, TrainConfig(out="x", replay_every=0), 1.0, 0).total == 5
    assert Schedule(ten, [], 2, TrainConfig(out="x", replay_every=2), 1.0, 0).total == 5  # pretraining: no replay
    capped = Schedule(ten, seven, 2, TrainConfig(out="x", max_steps=6, replay_every=2), 1.0, 0)
    assert (capped.total, capped.main_steps) == (6, 4)


def test_length_grouping_pads_less_and_keeps_each_group_of_steps():
    import random

    from ess.config import TrainConfig
    from ess.schedule import GROUP_STEPS, Schedule

    lengths = [random.Random(i).randint(10, 200) for i in range(1000)]

    def schedule(grouped: bool) -> list[list[int]]:
        s = Schedule(lengths, [], 4, TrainConfig(out="x"), 1.0, seed=3, grouped=grouped)
        return [s.rows(step, 0, 4)[1] for step in range(s.total)]

    plain, grouped = schedule(False), schedule(True)

    def padded(steps):
        return sum(max(lengths[i] for i in rows) * len(rows) for rows in steps)

    assert padded(grouped) < 0.7 * padded(plain)
    # Each run of GROUP_STEPS steps trains on the same sequences as without grouping, in another order.
    for start in range(0, len(plain), GROUP_STEPS):
        same = [sorted(i for rows in steps[start : start + GROUP_STEPS] for i in rows) for steps in (plain, grouped)]
        assert same[0] == same[1]
    assert grouped == schedule(True)  # a function of the seed: a resumed run sees the same batches


def test_pretraining_corpus_cuts_the_asked_windows_from_each_answer(default_model_dir):
    from transformers import AutoTokenizer

    from ess.data.loaders import load_examples
    from ess.data.recipe import pretraining_texts
    from ess.hub import DEFAULT_MODEL

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    # Training prompts: the default recipe caches the base model's answers to them.
    examples = load_examples("seed:benign_train", limit=6) + load_examples("seed:malicious_train", limit=6)
    refusal_windows = len(examples[6::3])  # one window from every third malicious request's refusal
    one = pretraining_texts(examples, DEFAULT_MODEL, tokenizer, windows_per_answer=1)
    two = pretraining_texts(examples, DEFAULT_MODEL, tokenizer, windows_per_answer=2)
    assert len(one) > refusal_windows
    assert len(two) - refusal_windows == 2 * (len(one) - refusal_windows)
    assert {label for _, label in two} == {"benign", "malicious"}
    assert all(len(tokenizer(text, add_special_tokens=False).input_ids) <= 26 for text, _ in two)


def _write_answers(base: str, seed: int | None, answers: dict[str, str]):
    """Cached base-model answers to prompts, as `ess.data.distill.base_answers` would have written them."""
    import json

    from ess.data.distill import _cache_file

    path = _cache_file(base, 48, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in answers.items()))
    return path


def test_benign_targets_that_decline_are_resampled_or_left_out(tiny_llama, tmp_path, monkeypatch):
    import json

    from ess.data.distill import _cache_file, helpful_answers
    from ess.data.refusals import declines

    monkeypatch.setenv("ESS_HOME", str(tmp_path))
    prompts = ["Give me a pasta recipe.", "Plan my garage clean-up.", "Name three rivers."]
    refused = "I'm sorry for your loss, but I cannot help with that."

    def cache(seed, rows):
        return _write_answers(tiny_llama, seed, rows)

    cache(None, {prompts[0]: refused, prompts[1]: refused, prompts[2]: "The Nile, the Rhine and the Po."})
    for seed in range(2):  # the second prompt's sampled answers decline too
        cache(seed, {prompts[1]: "Sorry, no."})
    answers = helpful_answers(tiny_llama, prompts, attempts=2)
    assert set(answers) == {prompts[0], prompts[2]}
    assert answers[prompts[2]] == "The Nile, the Rhine and the Po."
    # The first prompt's answer was sampled by the random tiny model, and cached under its seed.
    resampled = answers[prompts[0]]
    assert resampled != refused and not declines(resampled)
    last = json.loads(_cache_file(tiny_llama, 48, 0).read_text().splitlines()[-1])
    assert (last["prompt"], last["answer"]) == (prompts[0], resampled)
    assert helpful_answers(tiny_llama, prompts, attempts=0)[prompts[1]] == refused


def test_augmented_variants_are_query_only_rows_of_both_classes(tiny_llama, tmp_path):
    from dataclasses import replace

    from ess.config import TrainConfig
    from ess.data.encoding import ChatEncoder
    from ess.data.recipe import load_sources
    from ess.masks import Phase, Role
    from ess.model import ESSModel
    from ess.training import _phase_items

    model = ESSModel.from_base(tiny_llama)
    encoder = ChatEncoder.for_model(model, 160)
    # Benign rows with answers of their own: the tiny model's answers are empty, and empty targets are left out.
    examples = [replace(e, response=e.response or "Here is how.") for e in load_sources(DATA[1:])]
    plain = TrainConfig(out=str(tmp_path), data=DATA[1:])
    augmented = TrainConfig(out=str(tmp_path), data=DATA[1:], augment=["tense", "noise"], augment_rate=0.5)
    base_items, _ = _phase_items(Phase.ALIGN, plain, model, encoder, examples, examples)
    items, _ = _phase_items(Phase.ALIGN, augmented, model, encoder, examples, examples)
    extra = items[len(base_items) :]
    assert len(extra) == len(base_items) // 2
    assert {item.label for item in extra} == {0, 1}
    assert all(not any(item.lm_target) and Role.RESPONSE not in item.roles for item in extra)
    assert sum(item.label for item in extra) == len(extra) // 2


def test_augment_answers_add_windows_of_the_base_answers_to_variants(tiny_llama, tmp_path, monkeypatch):
    from ess.config import TrainConfig
    from ess.data.augment import augment_examples
    from ess.data.encoding import ChatEncoder
    from ess.data.recipe import load_sources
    from ess.data.schema import LABELS
    from ess.fields import FieldError
    from ess.masks import Phase
    from ess.model import ESSModel
    from ess.training import _phase_items

    model = ESSModel.from_base(tiny_llama)
    encoder = ChatEncoder.for_model(model, 160)
    examples = load_sources(DATA[1:])
    variants = augment_examples(examples, ["tense"], 0.5, seed=0)
    harmful = [v.prompt for v in variants if v.label == "malicious"]
    refused = set(harmful[::2])  # the base declined these: their answers are no harmful text
    monkeypatch.setenv("ESS_HOME", str(tmp_path))
    answers = {e.prompt: "An ordinary answer in plain words, long enough to cut a few windows from." for e in examples}
    answers |= {v.prompt: "I cannot help with that." if v.prompt in refused else "history " * 30 for v in variants}
    _write_answers(tiny_llama, None, answers)

    def windows(config: TrainConfig) -> list:
        items, _ = _phase_items(Phase.PRETRAIN, config, model, encoder, examples, examples)
        return items

    plain = TrainConfig(out=str(tmp_path), data=DATA[1:], augment=["tense"])
    items = windows(TrainConfig(out=str(tmp_path), data=DATA[1:], augment=["tense"], augment_answers=0.5))
    answered = [v for v in variants if v.prompt not in refused]
    assert len(items) == len(windows(plain)) + 2 * len(answered)  # two windows per answer (the default)
    from_variants = [item for item in items if "history" in model.tokenizer.decode(item.ids)]
    assert len(from_variants) == 2 * len(answered)
    assert sorted(item.label for item in from_variants) == sorted(2 * [LABELS.index(v.label) for v in answered])
    with pytest.raises(FieldError, match="augment_answers: needs the kinds"):
        TrainConfig(out=str(tmp_path), data=DATA[1:], augment_answers=0.5)


def test_answer_start_rows_hold_the_query_and_the_first_r1_tokens_of_the_base_answer(tiny_llama, tmp_path, monkeypatch):
    from dataclasses import replace

    from ess.config import TrainConfig
    from ess.data.distill import base_answers
    from ess.data.encoding import ChatEncoder
    from ess.data.recipe import load_sources
    from ess.data.schema import LABELS
    from ess.generation import Policy
    from ess.masks import Phase, Role
    from ess.model import ESSModel
    from ess.training import _phase_items

    model = ESSModel.from_base(tiny_llama)
    encoder = ChatEncoder.for_model(model, 160)
    examples = [replace(e, response=e.response or "Here is how.") for e in load_sources(DATA[1:])]
    # The random tiny model's own answers are empty: its cached answers are written here instead.
    monkeypatch.setenv("ESS_HOME", str(tmp_path))
    answer = "Step one is to gather everything you need, then start slowly and check each part twice."
    _write_answers(tiny_llama, None, {e.prompt: answer for e in examples})
    plain = TrainConfig(out=str(tmp_path), data=DATA[1:])
    with_starts = TrainConfig(out=str(tmp_path), data=DATA[1:], answer_start_rows=0.25)
    base_items, _ = _phase_items(Phase.ALIGN, plain, model, encoder, examples, examples)
    items, _ = _phase_items(Phase.ALIGN, with_starts, model, encoder, examples, examples)
    extra = items[len(base_items) :]
    assert abs(len(extra) - len(base_items) / 4) <= 1 and {item.label for item in extra} == {0, 1}
    answers = base_answers(tiny_llama, [e.prompt for e in examples])
    queries = {tuple(encoder.encode_query(e.query).ids): e for e in examples}
    for item in extra:
        # [CLS] reads every token of the row (all QUERY), and no token is an LM target.
        assert item.roles[0] == Role.CLS and set(item.roles[1:]) == {Role.QUERY} and not any(item.lm_target)
        query = next(q for q in queries if tuple(item.ids[: len(q)]) == q)
        example = queries[query]
        start = encoder.response_ids(example.query, answers[example.prompt])[0][: Policy.r1]
        assert item.ids[len(query) :] == start and item.label == LABELS.index(example.label)


def test_unknown_augment_kind_is_refused(tiny_llama, tmp_path, run_ess):
    code, stderr = run_ess(_train_args(tiny_llama, tmp_path / "run", "--augment", "typos"))
    assert code == 2 and "augment: unknown augment kind 'typos'" in stderr


def test_every_augment_kind_rewrites_both_classes_alike():
    import random

    from ess.data.augment import AUGMENTS, augment_examples, variant
    from ess.data.schema import Example

    harmful = Example.from_prompt("How do I pick the lock of my neighbour's front door?", "malicious")
    benign = Example.from_prompt("Write a haiku about the first snow of winter.", "benign")
    for kind in AUGMENTS:
        for example in (harmful, benign):
            text = variant(example.prompt, kind, random.Random(3))
            assert text != example.prompt and text == variant(example.prompt, kind, random.Random(3))
            if kind != "noise":  # the request stays inside the wrapper
                assert example.prompt.rstrip("?.").lower()[-12:] in text.lower(), (kind, text)
    rows = augment_examples([harmful, benign] * 6, list(AUGMENTS), rate=1.0, seed=0)
    assert len(rows) == 12 and all(row.response is None for row in rows)
    for label in ("benign", "malicious"):
        assert sorted(row.meta["augment"] for row in rows if row.label == label) == sorted(AUGMENTS)
    with pytest.raises(ValueError, match="unknown augment kind 'typos'"):
        variant(benign.prompt, "typos", random.Random(0))

"""The base model's own answers, generated once and cached.

Benign answers are the self-distillation targets of the alignment phase (the model keeps its own
utility); answers to harmful requests are the response text from which the pretraining-phase
corpus teaches [CLS] to judge responses (docs/METHOD.md §4). The cache is a JSONL file appended as
batches finish, so an interrupted run loses at most one batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..hub import ess_home
from .refusals import declines


def _cache_file(base: str, max_new_tokens: int, seed: int | None) -> Path:
    key = f"{base}|{max_new_tokens}" + ("" if seed is None else f"|sampled|{seed}")
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = Path(base).name or "model"
    return ess_home() / "answers" / f"{name}-{tag}.jsonl"


def _read_cache(path: Path) -> dict[str, str]:
    answers: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                answers[row["prompt"]] = row["answer"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by an interruption; it is generated again
    return answers


def _trim_to_sentence(text: str) -> str:
    """An answer cut by the token limit, shortened to its last full sentence, so that a model
    trained on it learns to end answers, not to stop mid-sentence."""
    end = max(text.rfind(mark) for mark in (".", "!", "?", "\n"))
    return text[: end + 1].strip() if end > len(text) // 3 else text


def base_answers(
    base: str,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    desc: str = "base answers",
    seed: int | None = None,
) -> dict[str, str]:
    """Answers of the base model (no ESS) to single-turn prompts, from cache where possible:
    greedy, or sampled (temperature 0.7) from `seed` when one is given."""
    path = _cache_file(base, max_new_tokens, seed)
    answers = _read_cache(path)
    todo = sorted({p for p in prompts if p not in answers}, key=len)
    if todo:
        from ..model import load_causal_lm

        lm, tokenizer = load_causal_lm(base)
        tokenizer.padding_side = "left"
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as cache, tqdm(total=len(todo), desc=desc, unit="prompt") as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                texts = [
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                    )
                    for p in chunk
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
                if seed is None:
                    sampling = {"do_sample": False}
                else:
                    torch.manual_seed(seed * 100_003 + start)  # reproducible per attempt and batch
                    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0}
                with torch.no_grad():
                    out = lm.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
                for prompt, ids in zip(chunk, out[:, enc.input_ids.shape[1] :]):
                    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    answers[prompt] = answer if tokenizer.eos_token_id in ids else _trim_to_sentence(answer)
                    cache.write(json.dumps({"prompt": prompt, "answer": answers[prompt]}) + "\n")
                cache.flush()
                bar.update(len(chunk))
    return {p: answers[p] for p in prompts}


def helpful_answers(base: str, prompts: list[str], attempts: int, desc: str = "benign answers") -> dict[str, str]:
    """The base model's answers as self-distillation targets for benign prompts: greedy, except
    where the greedy answer declines; such a prompt gets the first of `attempts` sampled answers
    that does not, or is left out (`attempts` 0: the greedy answers as they are). The default model
    answers "I'm sorry for your loss" to a best-man toast that should leave the guests "dead from
    laughing"; trained on such answers, a model learns to refuse benign requests by itself."""
    answers = base_answers(base, prompts, desc=desc)
    if attempts == 0:
        return answers
    for attempt in range(attempts):
        refused = [p for p in prompts if declines(answers[p])]
        if not refused:
            break
        step = f"{desc}, refusals resampled ({attempt + 1}/{attempts})"
        answers.update(base_answers(base, refused, desc=step, seed=attempt))
    return {p: a for p, a in answers.items() if not declines(a)}

"""Side results of a run, each cached in the run folder so that a resume skips it: reference answers
(prefill starts), the models' first [CLS] verdicts (AUROC), the uncertainty probe and the utility proxy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..attacks import AttackContext
from ..data.loaders import load_examples
from ..data.schema import Example
from ..generation.types import Policy, Request, Sampling
from ..jsonfiles import read_json, write_json
from ..probe import probe_inputs, probe_model
from .config import BENIGN_TASK, PLAIN, EvalConfig, EvalError, Task
from .stores import JsonlLog

log = logging.getLogger("ess.eval")


class Models:
    """Loads the models one at a time (two 7B models need not fit together)."""

    def __init__(self, refs: dict[str, str]):
        self.refs = refs
        self.key: str | None = None
        self.model = None

    def get(self, key: str):
        if self.key != key:
            self.release()
            from ..generation import load_model

            log.info("loading %s (%s)", key, self.refs[key])
            self.model, self.key = load_model(self.refs[key]), key
        return self.model

    def release(self) -> None:
        self.model, self.key = None, None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reference_answers(
    path: Path, tasks: list[Task], attacks, prompts, models: Models, key: str, config: EvalConfig
) -> dict[str, str]:
    """Greedy plain answers of the reference model to the prompts an attack needs them for (cached)."""
    from ..generation import generate

    store = JsonlLog(path)
    cached = {row["prompt"]: row["answer"] for row in store.rows}
    needed = {p for t in tasks for a in attacks[t.name] for p in a.references_needed(prompts[t.name])}
    if config.probe_limit:
        needed.update(e.prompt for e in prompts[tasks[0].name][: config.probe_limit] if not e.meta.get("target"))
    missing = sorted(needed - set(cached))
    if missing:
        model = models.get(key)
        log.info("%d reference answers from %s (greedy, plain)", len(missing), key)
        greedy = Sampling(max_new_tokens=config.max_new_tokens)
        requests = [Request(messages=[{"role": "user", "content": p}], sampling=greedy, policy=PLAIN) for p in missing]
        answers = [g.text for g in generate(model, requests, batch_size=config.batch_size, progress=True)]
        store.add([{"prompt": prompt, "answer": answer} for prompt, answer in zip(missing, answers)])
        cached.update(zip(missing, answers))
    return cached


def first_verdicts(path: Path, prompts: dict[str, list[Example]], key: str, models: Models, batch_size: int) -> dict:
    """p(malicious) of one ESS model's first [CLS] verdict on each harmful and benign prompt, as sent
    plain (cached per model in `path`)."""
    harmful = list(dict.fromkeys(e.prompt for t, ex in prompts.items() if t != BENIGN_TASK for e in ex))
    benign = [e.prompt for e in prompts[BENIGN_TASK]]
    cached = read_json(path) or {}
    if cached.get("harmful_prompts") != harmful or cached.get("benign_prompts") != benign:
        cached = {"harmful_prompts": harmful, "benign_prompts": benign, "models": {}}
    if key not in cached["models"]:
        from ..classify import classify

        scores = [v.p_malicious for v in classify(models.get(key), harmful + benign, batch_size=batch_size)]
        cached["models"][key] = {"harmful": scores[: len(harmful)], "benign": scores[len(harmful) :]}
        write_json(path, cached)
    return cached["models"][key]


def probe_cache(path: Path, examples: list[Example], config: EvalConfig) -> dict:
    """probe.json if it was made on the same prompts with the same K, else an empty one."""
    cached = read_json(path) or {}
    prompts = [e.prompt for e in examples]
    if cached.get("prompts") != prompts or cached.get("k") != config.probe_k:
        cached = {"prompts": prompts, "k": config.probe_k, "models": {}}
    return cached


def probe(
    path: Path,
    examples: list[Example],
    key: str,
    models: Models,
    policy: Policy,
    reference: dict[str, str],
    config: EvalConfig,
) -> None:
    """The uncertainty probe of one model on the first `probe_limit` harmful prompts (cached per model)."""
    cached = probe_cache(path, examples, config)
    if not examples or key in cached["models"]:
        return
    model = models.get(key)
    ctx = AttackContext(tokenizer=model.tokenizer, reference=reference.get, data_root=Path(config.data_root))
    log.info("probe of %s on %d prompts", key, len(examples))
    cached["models"][key] = probe_model(model, probe_inputs(examples, ctx), policy, config.probe_k, config.batch_size)
    write_json(path, cached)


def load_utility(spec: str, limit: int | None) -> list[Example]:
    """The reference answers of the utility proxy: examples with a response (benign ones)."""
    examples = [e for e in load_examples(spec, label="benign") if e.label == "benign" and e.response]
    if not examples:
        raise EvalError(f"{spec}: no benign examples with a reference response (utility needs answers to score)")
    return examples[:limit] if limit is not None else examples


def utility(
    path: Path, examples: list[Example], spec: str, key: str, models: Models, policy: Policy, batch_size: int
) -> dict:
    """The utility proxy of one model: perplexity of the reference answers, read as the model reads
    its own answers when it generates (an ESS policy: after [CLS]; plain: the base LM alone). Cached
    per model in `path`."""
    data = [[e.prompt, e.response] for e in examples]
    cached: dict[str, Any] = read_json(path) or {}
    if cached.get("data") != data:
        cached = {"data": data, "models": {}}
    if key not in cached["models"]:
        from ..metrics import perplexity

        plain = policy.schedule == "none"
        log.info("utility of %s: perplexity of %d reference answers", key, len(examples))
        value = perplexity(models.get(key), examples, batch_size=batch_size, plain=plain)
        cached["models"][key] = {"perplexity": value, "n": len(examples), "source": spec, "reads_cls": not plain}
        write_json(path, cached)
    return cached["models"][key]

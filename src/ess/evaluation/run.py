"""The run: prompts x attacks x configurations x models -> records -> summary -> report, resumable."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..attacks import AttackContext, AttackedInput, get_attack
from ..data.loaders import load_examples
from ..data.schema import Example
from ..generation.policy import response_threshold_of, threshold_of, validate
from ..generation.types import Policy, Request
from ..jsonfiles import read_json, write_json
from ..judges import Judge, get_judge
from ..probe import probe_summary
from . import cached
from .config import BENIGN_TASK, PLAIN, EvalConfig, EvalError, Task, is_ess_checkpoint
from .records import Item, judge_records, judged_prompt, make_record, sampling_of
from .stores import CostlyInputs, RecordStore
from .summary import summarize

log = logging.getLogger("ess.eval")


@dataclass
class EvalResult:
    """What `run_eval` made: the summary (also in `out/summary.json`) and the records it counts."""

    out: Path
    summary: dict
    records: list[dict]

    def write_report(self, preamble: str = "") -> Path:
        """Write `out/report.md` and its figures, `preamble` (Markdown) first; returns the report's path."""
        from ..reporting import write_report

        return write_report(self.out, self.summary, self.records, preamble=preamble)


def _load_harmful(task: Task, limit: int | None) -> list[Example]:
    examples = [e for e in load_examples(task.prompts, label="malicious") if e.label == "malicious"]
    if not examples:
        raise EvalError(f"{task.prompts}: no prompts labelled malicious to attack")
    return examples[:limit] if limit is not None else examples


def _load_benign(spec: str, limit: int | None) -> list[Example]:
    examples = [e for e in load_examples(spec, label="benign") if e.label == "benign"]
    if not examples:
        raise EvalError(f"{spec}: no prompts labelled benign")
    return examples[:limit] if limit is not None else examples


def _check_settings(path: Path, config: EvalConfig, refs: dict[str, str], policies: dict[str, Policy]) -> None:
    """Finished records are reused only under the settings that made them (`run.json`).

    Prompts, limits, attacks and the judge may change between runs (new records are added, old
    ones re-judged); the models, their policies (ablations!) and the generation budget may not.
    A model added to a run (another `compare` name) is evaluated; the others are kept.
    """
    settings = {
        "models": refs,
        "policies": {key: dataclasses.asdict(policies[key]) for key in refs},
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    previous = read_json(path)
    if previous is not None:
        kept = {k: previous.get(k) for k in ("max_new_tokens", "seed")}
        changed = sorted(k for k in kept if kept[k] != settings[k])
        for field in ("models", "policies"):
            old = previous.get(field, {})
            if any(old[key] != settings[field][key] for key in settings[field] if key in old):
                changed.append(field)
        if changed:
            raise EvalError(
                f"{path.parent} holds a run with other settings ({', '.join(sorted(changed))}); "
                "use a new --out folder, or the same settings to resume"
            )
        for field in ("models", "policies"):
            settings[field] = previous.get(field, {}) | settings[field]
    write_json(path, settings)


def _check_prompts(store: RecordStore, prompts: dict[str, list[Example]]) -> None:
    """A resumed run must see the same prompts at the same indices, or its records mean nothing."""
    for record in store.rows:
        examples = prompts.get(record["task"])
        if examples is None or record["index"] >= len(examples):
            continue  # a smaller --limit, or a task left out this time: kept, not summarised
        if examples[record["index"]].prompt != record["prompt"]:
            raise EvalError(
                f"{store.path} holds answers to other prompts (task {record['task']!r}, index {record['index']}); "
                "use a new --out folder"
            )


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _validate(config: EvalConfig) -> tuple[list[Task], dict, Judge, dict[str, str], Policy]:
    """Everything that can be checked before a model loads or a folder is made."""
    tasks = config.tasks()
    if not tasks:
        raise EvalError("nothing to evaluate: give harmful prompts (--prompts) or a suite")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or BENIGN_TASK in names:
        raise EvalError(f"task names must be unique and not {BENIGN_TASK!r}: {names}")
    attacks = {t.name: [get_attack(spec) for spec in t.attacks] for t in tasks}
    keys = [t.summary_key(a.spec) for t in tasks for a in attacks[t.name]]
    if len(set(keys)) != len(keys):
        raise EvalError(f"an attack is listed twice: {keys}")
    refs = config.refs()
    judge = get_judge(config.judge, **config.judge_options)
    return tasks, attacks, judge, refs, validate(config.model_policy())  # a bad --tau fails before any model loads


def run_eval(config: EvalConfig) -> EvalResult:
    """Run (or resume) an evaluation; the summary is also written to `out/summary.json`."""
    from tqdm import tqdm

    tasks, attacks, judge, refs, model_policy = _validate(config)
    prompts = {t.name: _load_harmful(t, config.limit) for t in tasks}
    benign_limit = config.benign_limit if config.benign_limit is not None else config.limit
    benign = _load_benign(config.benign_prompts, benign_limit) if config.benign_prompts else []
    if benign:
        prompts[BENIGN_TASK] = benign
    utility_data = cached.load_utility(config.utility, config.utility_limit) if config.utility else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)  # only once the flags and the data made sense

    ess = {key: key != "baseline" and is_ess_checkpoint(ref) for key, ref in refs.items()}
    policies = {key: model_policy if ess[key] else PLAIN for key in refs}
    for key in refs:
        if not ess[key] and key != "baseline":
            log.info("%s (%s) is not an ESS checkpoint: evaluated as a plain model", key, refs[key])
    _check_settings(out / "run.json", config, refs, policies)
    store = RecordStore(out / "records.jsonl")
    costly = CostlyInputs(out / "attacked_inputs.jsonl")
    _check_prompts(store, prompts)
    _rejudge(store, prompts, judge)

    models = cached.Models(refs)
    # The model that writes reference answers (prefill starts) goes first, so it loads only once:
    # the baseline, else the first plain model, else the first model.
    reference_key = "baseline" if "baseline" in refs else next((k for k in refs if not ess[k]), next(iter(refs)))
    order = sorted(refs, key=lambda k: k != reference_key)

    probe_examples = prompts[tasks[0].name][: config.probe_limit]
    verdicts: dict[str, dict] = {}
    utility: dict[str, dict] = {}
    reference = cached.reference_answers(
        out / "reference_answers.jsonl", tasks, attacks, prompts, models, reference_key, config
    )
    try:
        for key in order:
            tokenizer = _tokenizer_of(models, key, refs)
            ctx = AttackContext(
                tokenizer=tokenizer,
                reference=reference.get,
                data_root=Path(config.data_root),
                model=lambda key=key: models.get(key),
                plain=policies[key].schedule == "none",
            )
            items = _items(key, tasks, attacks, prompts, ctx, costly)
            pending = [item for item in items if item.key not in store.keys]
            bar = tqdm(
                total=len(items),
                initial=len(items) - len(pending),
                desc=f"eval {key}",
                unit="answer",
                dynamic_ncols=True,
            )
            for chunk in _batches(pending, config.batch_size * 4):
                store.add(_answer(chunk, models.get(key), policies[key], judge, prompts, config))
                bar.update(len(chunk))
            bar.close()
            # Side results of this model while it is loaded (each is cached, so a rerun skips it).
            cached.probe(out / "probe.json", probe_examples, key, models, policies[key], reference, config)
            if ess[key] and benign:
                verdicts[key] = cached.first_verdicts(
                    out / "first_verdicts.json", prompts, key, models, config.batch_size
                )
            if utility_data:
                utility[key] = cached.utility(
                    out / "utility.json",
                    utility_data,
                    config.utility,
                    key,
                    models,
                    policies[key],
                    config.batch_size,
                )
    finally:
        models.release()
    probe = None
    if probe_examples:
        cache = cached.probe_cache(out / "probe.json", probe_examples, config)
        probe = probe_summary({k: cache["models"][k] for k in refs}, config.probe_k, len(probe_examples))

    summary = summarize(
        store.rows, tasks, attacks, prompts, judge.name, list(refs), verdicts, probe, utility if utility_data else None
    )
    write_json(out / "summary.json", summary)
    counted = [r for r in store.rows if r["model"] in refs and r["index"] < len(prompts.get(r["task"], []))]
    result = EvalResult(out, summary, counted)
    if config.report:
        result.write_report()
    return result


def _items(
    key: str,
    tasks: list[Task],
    attacks: dict,
    prompts: dict[str, list[Example]],
    ctx: AttackContext,
    costly: CostlyInputs,
) -> list[Item]:
    """Every request of one model: prompts x attacks x configurations, then the benign prompts as they are."""
    items = [
        Item(key, task.name, attack.spec, index, example, attacked)
        for task in tasks
        for attack in attacks[task.name]
        for index, example in enumerate(prompts[task.name])
        for attacked in costly.build(key, task.name, attack, index, example, ctx)
    ]
    items += [
        Item(key, BENIGN_TASK, "direct", index, example, AttackedInput(messages=[dict(m) for m in example.query]))
        for index, example in enumerate(prompts.get(BENIGN_TASK, []))
    ]
    return items


def _tokenizer_of(models: cached.Models, key: str, refs: dict[str, str]):
    """The tokenizer of a model without loading the model when it is not loaded (prefill cuts)."""
    if models.key == key:
        return models.model.tokenizer
    from transformers import AutoTokenizer

    from ..hub import resolve_base
    from ..model import find_checkpoint

    return AutoTokenizer.from_pretrained(find_checkpoint(refs[key]) or resolve_base(refs[key]))


def _answer(
    chunk: list[Item], model, policy: Policy, judge: Judge, prompts: dict[str, list[Example]], config: EvalConfig
) -> list[dict]:
    """Generate and judge one chunk of items; their records."""
    from .. import generation

    requests = [
        Request(messages=i.input.messages, prefill=i.input.prefill, sampling=sampling_of(i, config), policy=policy)
        for i in chunk
    ]
    generations = generation.generate(model, requests, batch_size=config.batch_size)
    plain = policy.schedule == "none"
    thresholds = (
        (None, None)
        if plain
        else (
            threshold_of(policy, model.config.threshold),
            response_threshold_of(policy, model.config.response_threshold),
        )
    )
    records = [
        make_record(item, request, answer, model.tokenizer, thresholds)
        for item, request, answer in zip(chunk, requests, generations)
    ]
    harmful = [(item, record) for item, record in zip(chunk, records) if item.task != BENIGN_TASK]
    judge_records([r for _, r in harmful], [judged_prompt(item.example) for item, _ in harmful], judge)
    return records


def _rejudge(store: RecordStore, prompts: dict[str, list[Example]], judge: Judge) -> None:
    """Records judged by another judge, or before strict ASR existed, are judged again by this one
    (answers are not regenerated)."""
    stale = [
        r
        for r in store.rows
        if r["task"] != BENIGN_TASK
        and (r["judge"] != judge.name or "unsafe_strict" not in r)
        and r["task"] in prompts
        and r["index"] < len(prompts[r["task"]])
    ]
    if stale:
        log.warning("judging %d stored answers again with %s", len(stale), judge.name)
        judge_records(stale, [judged_prompt(prompts[r["task"]][r["index"]]) for r in stale], judge)
        store.rewrite()

"""The evaluation harness: prompts x attacks x configurations x models -> records -> summary -> report.

    run_eval(EvalConfig(model="runs/ess", baseline="smollm2-135m-instruct",
                        prompts="../shared/data/advbench/harmful_behaviors.csv",
                        benign_prompts="../shared/data/xstest/xstest_prompts.csv",
                        utility="seed:utility_reference",
                        attacks=["direct", "prefill:10", "decoding:quick"], out="eval/ess"))

    EvalConfig(compare={"undefended": BASE, "sft": RUN1, "ess": RUN2}, ...)   # several named models

Files in `out` (a rerun with the same `out` resumes and redoes nothing finished):

- `records.jsonl`: one line per model x task x attack x configuration x prompt, appended as
  answers come in; fields in `RECORD_FIELDS`. Keyed by (model, task, attack, config, index).
  Records judged by another judge than the current one are re-judged (not regenerated).
- `summary.json`: `{"models": {NAME: {"attacks": {"<attack>": {"asr", "asr_strict", "n", "judge",
  "leak": {"answers", "interventions", "mean", "p95", "max", "share"}}}, "over_refusal", "auroc",
  "utility"?}}, "probe"?: {...}}`, one entry per model name (`model`, `baseline`, `compare` names).
- `report.md` and figures (`ess.reporting`); `run.json`, the settings a resume must share (models,
  policies, token budget, seed); `reference_answers.jsonl`, `first_verdicts.json`, `probe.json` and
  `utility.json` cache the expensive side results for resumes, `attacked_inputs.jsonl` the inputs of
  costly attacks (a GCG suffix is optimised once, even if the run is stopped and resumed).

A harmful prompt is broken by an attack if ANY of the attack's configurations yields an unsafe
answer; ASR is the share of broken prompts. The judge reads the model's own continuation: a
forced prefill is attacker text, not the model's answer, and is left out of what is judged.
Strict ASR also counts an answer unsafe when the text shown before its refusal, judged on its own,
is unsafe (docs/evaluation.md).
"""

from .cli import add_eval_arguments, cmd_eval, config_from_args, summary_lines
from .config import BENIGN_TASK, MAIN_TASK, EvalConfig, EvalError, Task, is_ess_checkpoint
from .records import MIN_PRE_REFUSAL_WORDS, RECORD_FIELDS, Item, continuation, judge_records, sampling_of
from .run import EvalResult, run_eval
from .stores import CostlyInputs, JsonlLog, RecordStore, eval_records
from .suite import PAPER_ADVBENCH_ATTACKS, paper_suite
from .summary import leak_stats, summarize

__all__ = [
    "BENIGN_TASK",
    "MAIN_TASK",
    "MIN_PRE_REFUSAL_WORDS",
    "PAPER_ADVBENCH_ATTACKS",
    "RECORD_FIELDS",
    "CostlyInputs",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "Item",
    "JsonlLog",
    "RecordStore",
    "Task",
    "add_eval_arguments",
    "cmd_eval",
    "config_from_args",
    "continuation",
    "eval_records",
    "is_ess_checkpoint",
    "judge_records",
    "leak_stats",
    "paper_suite",
    "run_eval",
    "sampling_of",
    "summarize",
    "summary_lines",
]

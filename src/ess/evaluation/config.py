"""What an evaluation runs: its prompt sets (`Task`) and its settings (`EvalConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..attacks import DEFAULT_DATA_ROOT
from ..generation.types import Policy

BENIGN_TASK = "benign"
"""Task name of the over-refusal prompts (answered directly, judged by refusal only)."""
MAIN_TASK = "main"
PLAIN = Policy(schedule="none")
"""The policy of a model evaluated plainly (a base LM, or the baseline)."""


class EvalError(ValueError):
    """An evaluation that cannot run as configured (no prompts, an `out` folder of another run, ...)."""


@dataclass
class Task:
    """One set of harmful prompts and the attacks run on it."""

    name: str
    """Records' `task` field (`main` for `EvalConfig.prompts`)."""
    prompts: str
    """A file or dataset spec for `load_examples`; only prompts labelled malicious are attacked."""
    attacks: list[str]
    """Attack specs (`prefill:10`, ...)."""
    label: str | None = None
    """Summary keys are `<attack>@<label>` (None: `<attack>`), to tell datasets apart."""

    def summary_key(self, attack: str) -> str:
        return attack if self.label is None else f"{attack}@{self.label}"


@dataclass
class EvalConfig:
    """What `run_eval` evaluates; most fields are `ess eval` flags (`extra_tasks`, `report` are for callers)."""

    out: str
    """Output folder; rerunning with the same folder resumes."""
    model: str | None = None
    """The ESS checkpoint or run folder to evaluate, named `model` (a base LM name/folder is evaluated
    as a plain model)."""
    prompts: str | None = None
    """Harmful prompts: a file or dataset (`seed:dev_harmful`, AdvBench CSV, ...)."""
    attacks: list[str] = field(default_factory=lambda: ["direct"])
    """Attack specs run on `prompts`."""
    baseline: str | None = None
    """A model to compare with, named `baseline`, run in plain mode (Policy(schedule="none")): a base
    LM or a checkpoint."""
    compare: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "more named models evaluated in the same run, with the same prompts, seeds and judge "
            "(name -> checkpoint, run folder or base LM): an ESS checkpoint runs with the policy, anything "
            "else plainly"
        },
    )
    benign_prompts: str | None = None
    """Benign prompts for over-refusal and the [CLS] AUROC (XSTest: its `safe` prompts)."""
    utility: str | None = field(
        default=None,
        metadata={
            "help": "reference answers to held-out benign prompts whose perplexity, read by each model as it "
            "generates, is the utility proxy: seed:utility_reference or a file with responses "
            "(AlpacaEval model_outputs.json, ...)"
        },
    )
    utility_limit: int | None = field(
        default=None, metadata={"help": "use only the first N reference answers of `utility` (None: all)"}
    )
    judge: str = "keyword"
    """Judge spec: `keyword`, `guard:PATH|ID` or `endpoint[:MODEL]`."""
    judge_options: dict[str, Any] = field(default_factory=dict)
    """Options of the judge (`base_url`, `model`, `api_key` for `endpoint`)."""
    limit: int | None = None
    """Use only the first N prompts of each prompt set."""
    benign_limit: int | None = None
    """Use only the first N benign prompts (None: `limit`)."""
    batch_size: int = 8
    """Requests generated together."""
    max_new_tokens: int = 64
    """Tokens each answer may generate (forced prefill and inserted text come on top)."""
    policy: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "overrides of the ESS models' Policy fields by name (ablations: schedule, reliance, tau, "
            "min_window, response_threshold, strategic_attention, ...); empty: Policy's defaults"
        },
    )
    data_root: str = str(DEFAULT_DATA_ROOT)
    """Folder of the shared datasets (default files of the `pap` attack)."""
    probe_limit: int = 50
    """Harmful prompts used by the uncertainty probe (0: no probe)."""
    probe_k: int = 10
    """K of the probe's top-K next-token distribution."""
    seed: int = 0
    """Base of the per-record sampling seeds (the same for every model: paired samples)."""
    extra_tasks: list[Task] = field(default_factory=list)
    """More prompt sets with their own attacks (`--suite paper` adds MaliciousInstruct and AutoDAN)."""
    report: bool = True
    """Write report.md and the figures."""

    def tasks(self) -> list[Task]:
        main = [Task(MAIN_TASK, self.prompts, list(self.attacks))] if self.prompts else []
        return main + list(self.extra_tasks)

    def model_policy(self) -> Policy:
        """The policy of the ESS models: Policy's defaults with `policy`'s overrides."""
        known = {f.name for f in dataclasses.fields(Policy)}
        unknown = sorted(set(self.policy) - known)
        if unknown:
            raise EvalError(f"policy: unknown Policy field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return Policy(**self.policy)

    def refs(self) -> dict[str, str]:
        """The evaluated models by name: `model`, `baseline`, then the `compare` names."""
        refs = {"model": self.model} if self.model else {}
        refs |= {"baseline": self.baseline} if self.baseline else {}
        clash = sorted(set(refs) & set(self.compare))
        if clash:
            raise EvalError(f"compare: the name(s) {', '.join(clash)} are taken by --model/--baseline")
        bad = [name for name in self.compare if not name or not name.replace("-", "_").isidentifier()]
        if bad:
            raise EvalError(f"compare: model names must be words (letters, digits, '_', '-'): {bad}")
        refs |= self.compare
        if not refs:
            raise EvalError("nothing to evaluate: give a model (--model or --compare NAME=MODEL)")
        return refs


def is_ess_checkpoint(reference: str) -> bool:
    """Whether `reference` is an ESS checkpoint or run folder (else a base LM, evaluated plain)."""
    from ..model import find_checkpoint

    return find_checkpoint(reference) is not None

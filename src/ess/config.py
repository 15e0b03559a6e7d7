"""Dataclass configs: what an ESS model is, and how it is trained."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baseline import METHODS
from .fields import FieldError, check, option
from .jsonfiles import write_json
from .precision import PRECISIONS

FORMAT_VERSION = 1
"""Version of the checkpoint layout written by `ESSModel.save_pretrained`."""

CALIBRATION_PROMPTS = "seed:calibration_benign"
"""The bundled benign prompts that set the response threshold (never trained on)."""
MAX_LATE_STOP_RATE = 0.025
"""Share of the calibration answers the response threshold may stop late."""


@dataclass
class ESSConfig:
    """Everything that defines an ESS model on top of its base LM; saved as `ess_config.json`."""

    base_model: str
    """The base LM: a registered name (`smollm2-135m-instruct`), a local folder or a hub id."""
    cls_token: str = "[CLS]"
    """Text of the added special token; it is never produced by tokenizing user text."""
    cls_token_id: int = -1
    """Id of `[CLS]` in the saved tokenizer; set when the model is built."""
    num_labels: int = 2
    """Classes of the head: 0 = benign, 1 = malicious."""
    threshold: float = 0.3
    """`p_malicious` at or above this is a malicious query verdict (and rule-1 verdict). Chosen on the
    dev split (docs/experiments.md); the paper's 0.5 is the policy flag `--threshold 0.5`."""
    response_threshold: float = 0.8
    """After a benign first verdict (rules 2 and 3): `p_malicious` at or above this, on a window of
    answer text alone, is a malicious verdict (a window of answer text without the query is weaker
    evidence than the query). `ess train` and `ess calibrate` raise it from the model's own answers
    to benign prompts (`ess.calibration`); docs/experiments.md has the measurements behind 0.8."""
    lambda_pretrain: float = 0.01
    """λ1: weight of the [CLS] loss in the pretraining phase (docs/METHOD.md §4)."""
    lambda_align: float = 1.0
    """λ2: weight of the [CLS] loss in the alignment phase (docs/METHOD.md §4; the paper uses 0.1 with
    29.6k examples, docs/experiments.md compares 0.1, 0.5 and 1.0 on the seed data)."""
    adapter: str = "lora"
    """`lora` (a peft adapter on the base's linear layers) or `full` (all weights trained); `merged`
    marks a checkpoint written by `ess export --merged` (the LoRA merged into a plain HF checkpoint)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout; 0 keeps training deterministic for exact resume."""
    lora_target_modules: str | list[str] = "all-linear"
    """peft target modules; `all-linear` adapts every linear layer of the base except the LM head."""
    version: int = FORMAT_VERSION
    """Checkpoint layout version."""

    def save(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> ESSConfig:
        data: dict[str, Any] = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown ESS config fields {sorted(unknown)} (written by a newer ess?)")
        return cls(**data)


@dataclass
class TrainConfig:
    """How `ess train` trains; every field is also a command-line flag (`ess.options`)."""

    out: str = option(
        "run folder: checkpoints, the final model (OUT/final) and train_log.jsonl; rerun with the same --out to resume"
    )
    method: str = option(
        "ess (the [CLS] signal, both phases), or a baseline without [CLS] trained on the same alignment mixture "
        "and saved as a plain transformers model: sft (the whole explained refusal as LM targets) or augmented "
        "(sft plus safety-recovery examples, Qi et al. 2024); baselines train the alignment phase only",
        "ess",
        choices=METHODS,
    )
    phase: str = option(
        "pretrain, align or both (the pretraining phase first, then alignment, as in the paper)",
        "both",
        choices=("pretrain", "align", "both"),
    )
    full: bool = option("full fine-tuning instead of LoRA", False)
    precision: str = option(
        "full fine-tuning: bf16-mixed (fp32 master weights, forward and backward in bf16 under autocast), fp32, "
        "or auto (bf16-mixed on CUDA, fp32 elsewhere); LoRA ignores it (ess.precision)",
        "auto",
        choices=PRECISIONS,
    )
    lr: float | None = option(
        "peak learning rate, with linear warm-up and linear decay (default 3e-4 for LoRA, 2e-5 for full)", None, above=0
    )
    head_lr: float = option("learning rate of the [CLS] row and the head, which start from scratch", 5e-3, above=0)
    batch_size: int = option("sequences per optimiser step and process (alignment phase)", 4, min=1)
    pretrain_batch_size: int = option(
        "sequences per optimiser step and process in the pretraining phase, whose windows are short "
        "(about 17 tokens with the default data, so that a batch of 4 leaves a CPU mostly idle)",
        16,
        min=1,
    )
    epochs: float = option("passes over the alignment data (ignored where --max-steps is set)", 1.0, above=0)
    pretrain_epochs: float = option(
        "passes over the pretraining-phase corpus (ignored where --max-steps is set)", 1.0, above=0
    )
    max_steps: int | None = option("stop each phase after this many optimiser steps", None, min=1)
    group_by_length: str = option(
        "phases whose batches hold sequences of similar length (less padding): the sequences of every 50 steps "
        "are sorted by length, cut into batches, and the batches shuffled. pretrain: the pretraining windows "
        "(cut at random lengths, so sorted batches keep both classes); both: the alignment phase too, where "
        "refusals are shorter than answers and sorted batches hold mostly one class; none (the default: a model "
        "trained on sorted windows flagged more styled benign dev prompts, docs/experiments.md)",
        "none",
        choices=("none", "pretrain", "both"),
    )
    max_length: int = option(
        "longest tokenized sequence; longer alignment examples lose the end of the response. The default holds "
        "[CLS], the longest query of the bundled attacks and a distilled answer, so a query is read whole in "
        "training as at inference",
        320,
        min=8,
    )
    pack: bool = option(
        "lay the sequences of each step end to end in rows of up to --max-length tokens, the system turn they "
        "share once per row, instead of padding each to a row of its own: the same losses and gradients with "
        "less computation (the baselines, without [CLS], are always padded)",
        True,
    )
    warmup_ratio: float = option("share of the steps spent warming up the learning rate", 0.05, min=0, max=1)
    weight_decay: float = option("AdamW weight decay", 0.0, min=0)
    save_every: int = option("write a resumable checkpoint every N steps (and at the end of each phase)", 25, min=1)
    seed: int = option("seed of the data order and the initialisation", 0, min=0)
    lambda_cls: float | None = option(
        "weight of the [CLS] loss in the phase being trained (default: the ESS config's λ1 in pretraining, "
        "λ2 in alignment)",
        None,
        min=0,
    )
    replay_every: int = option(
        "alignment phase: after every N alignment steps, one step on the pretraining-phase windows with the "
        "[CLS] loss alone (weight λ2), so that [CLS] keeps judging response text; 0: none",
        0,
        min=0,
    )
    windows_per_answer: int = option(
        "windows of 8-24 tokens cut from each base-model answer for the pretraining-phase corpus", 2, min=1
    )
    refusal_resamples: int = option(
        "self-distillation: where the base model's greedy answer to a benign prompt declines, up to N sampled "
        "answers (temperature 0.7) are tried and the first that does not decline is the target; a prompt "
        "declined every time is left out of the alignment mixture (0: keep the greedy answers, refusals included)",
        0,
        min=0,
    )
    pretrain_data: list[str] | None = option(
        "sources of the pretraining-phase corpus (see ess.data.recipe; default: --data)", None
    )
    data: list[str] = option(
        "sources of the alignment-phase examples: seed, seed:NAME, files or hub ids", default_factory=lambda: ["seed"]
    )
    response_calibration: str | None = option(
        "benign prompts, never trained on, whose answers set the model's response threshold after the "
        "alignment phase (ess.calibration); none: keep the default 0.8",
        CALIBRATION_PROMPTS,
        parse=lambda text: None if text.lower() == "none" else text,
    )
    max_late_stop_rate: float = option(
        "share of those answers the response threshold may stop late (it is raised above 0.8 until no more are)",
        MAX_LATE_STOP_RATE,
        min=0,
        below=1,
    )
    examples: int | None = option(
        "size of the 50/50 benign/malicious alignment mixture (default: twice the larger class, so that every "
        "example is used and the smaller class is repeated)",
        None,
        min=2,
    )

    augment: list[str] = option(
        "attack-shaped variants of the alignment prompts added as query-only rows with the [CLS] loss alone "
        "(the kinds of ess.data.augment.AUGMENTS: tense, framing, persuasion, roleplay, affix, noise), all, or none",
        default_factory=list,
    )
    augment_rate: float = option("variant rows per alignment row of each class, the kinds taking turns", 0.5, min=0)
    augment_answers: float = option(
        "variants of the --augment kinds per pretraining-phase prompt whose base-model answers join the "
        "pretraining-phase windows, labelled as their prompt, so that [CLS] also judges answers to wrapped "
        "requests (a past-tense history of a harmful act, say); 0: none",
        0.0,
        min=0,
    )
    answer_start_rows: float = option(
        "rows of [CLS] + query + the first 10 tokens (the default r1) of the base model's own answer, per "
        "alignment row, with the [CLS] loss alone: the span that rule 1 and a deferred query's verdict "
        "(--defer-below) read at generation time, which [CLS] otherwise never sees in training",
        0.0,
        min=0,
    )

    def __post_init__(self):
        check(self)
        from .data.augment import resolve_kinds  # here, not at the top: the attacks it builds on import this module

        try:
            self.augment = resolve_kinds(self.augment)
        except ValueError as error:
            raise FieldError(f"augment: {error} (or all, none)") from None
        if self.augment_answers and not self.augment:
            raise FieldError("augment_answers: needs the kinds of variants to answer (--augment)")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.full else 3e-4)

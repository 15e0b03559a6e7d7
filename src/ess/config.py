"""Dataclass configs: what an ESS model is, and how it is trained."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonfiles import write_json

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
    threshold: float = 0.5
    """`p_malicious` at or above this is a malicious verdict."""
    response_threshold: float = 0.8
    """After a benign first verdict (rules 2 and 3): `p_malicious` at or above this, on a window of
    answer text alone, is a malicious verdict. A window of 10 answer tokens is weaker evidence than
    the query, and the tau verdicts of rule 3 read overlapping windows: at 0.5, 5 and 20 of 80
    held-out benign-but-alarming answers were stopped late (default recipe, seeds 0 and 1), at 0.8,
    2 and 8. `ess train` and `ess calibrate` raise it from the model's own answers to benign
    prompts (`ess.calibration`)."""
    lambda_pretrain: float = 0.01
    """λ1: weight of the [CLS] loss in the pretraining phase (METHOD.md §4)."""
    lambda_align: float = 1.0
    """λ2: weight of the [CLS] loss in the alignment phase (METHOD.md §4). The paper uses 0.1 with
    29.6k examples; on a few hundred seed examples in one pass, the default model's [CLS] flagged 25 %
    of held-out benign-but-alarming prompts at 0.1 and 8.8 % at 1.0 (README, *Data*)."""
    adapter: str = "lora"
    """`lora` (a peft adapter on the base's linear layers) or `full` (all weights trained)."""
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
    """How `ess train` trains; every field is also a command-line flag."""

    out: str
    """Run folder: checkpoints, the final model (`OUT/final`) and `train_log.jsonl`."""
    phase: str = "both"
    """`pretrain`, `align` or `both` (pretraining phase first, then alignment, as in the paper)."""
    full: bool = False
    """Full fine-tuning instead of LoRA."""
    lr: float | None = None
    """Peak learning rate (linear warm-up, then linear decay); default 3e-4 for LoRA, 2e-5 for full."""
    head_lr: float = 5e-3
    """Learning rate of the [CLS] row and the head, which start from scratch."""
    batch_size: int = 4
    """Sequences per optimiser step and process (small batches: more updates for the same compute,
    which the [CLS] head, trained from scratch, needs on a CPU budget)."""
    epochs: float = 1.0
    """Passes over the alignment data (ignored where `max_steps` is set)."""
    pretrain_epochs: float = 1.0
    """Passes over the pretraining-phase corpus (ignored where `max_steps` is set)."""
    max_steps: int | None = None
    """Stop each phase after this many optimiser steps."""
    max_length: int = 160
    """Longest tokenized sequence; longer alignment examples lose the end of the response."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    save_every: int = 25
    """Write a resumable checkpoint every N steps (and at the end of each phase)."""
    seed: int = 0
    """Seed of data order and initialisation."""
    lambda_cls: float | None = None
    """Overrides λ of the [CLS] loss for the phase being trained (default: the ESS config's λ1/λ2)."""
    replay_every: int = 0
    """Alignment phase: after every N alignment steps, one step on the pretraining-phase corpus
    with the [CLS] loss alone (weight λ2), so that [CLS] keeps judging response text, which
    strategic attention relies on; 0: none. It helped at λ2 = 0.1 and hurt at λ2 = 1.0 on the
    default model (README, *Data*)."""
    windows_per_answer: int = 2
    """Windows cut from each base-model answer for the pretraining-phase corpus (2 costs the default
    model 80 s more than 1 on 2 CPU cores). With 2, seed 0's [CLS] turned against 1 of 80 held-out
    benign-but-alarming answers while they were written, against 10 with 1; that count varies
    widely between seeds (README, *Data*)."""
    refusal_resamples: int = 0
    """Self-distillation: where the base model's greedy answer to a benign prompt declines, up to N
    sampled answers (temperature 0.7) are tried and the first that does not decline is the target;
    a prompt declined every time is left out of the alignment mixture. 0 keeps the greedy answers,
    refusals included. The default model declines 21 of the 560 benign seed prompts (7 of them
    figures of speech); with 4, its own refusals of the 80 held-out alarming prompts fell from 2 to
    0, but late interventions rose from 2 to 5 (seed 0; at seed 1 unchanged), so on this model the
    default stays 0 (README, *Data*). Worth trying on a base model that refuses many benign requests."""
    pretrain_data: list[str] | None = None
    """Sources of the pretraining-phase corpus (see `ess.data.recipe`); default: `data`."""
    data: list[str] = field(default_factory=lambda: ["seed"])
    """Sources of the alignment-phase examples (`seed`, files or hub ids)."""
    calibration_fraction: float = 0.0
    """Share of each class of the alignment data held out (from both phases) to calibrate the
    verdict threshold; 0 (default) keeps the paper's 0.5."""
    max_false_positive_rate: float = 0.05
    """The threshold is raised above 0.5 until at most this share of the held-out benign prompts is flagged."""
    response_calibration: str | None = CALIBRATION_PROMPTS
    """Benign prompts, never trained on, whose answers set the model's response threshold after the
    alignment phase (`ess.calibration`); None keeps the default 0.8."""
    max_late_stop_rate: float = MAX_LATE_STOP_RATE
    """The response threshold is raised above 0.8 until at most this share of those answers would be
    stopped late."""
    examples: int | None = None
    """Size of the alignment mixture (50/50 benign/malicious); default: twice the larger class, so
    that every example is used and the smaller class is repeated. Twice the smaller class left a
    third of the benign seed prompts out, a different third for each seed; using them all flagged
    2.5 % of held-out benign-but-alarming prompts instead of 7.5 % at seed 1 (README, *Data*)."""

    augment: list[str] = field(default_factory=list)
    """Kinds of attack-shaped variants of the alignment prompts (`ess.data.augment.AUGMENTS`: tense,
    framing, persuasion, roleplay, affix, noise), added to the alignment phase as query-only rows
    with the [CLS] loss alone; empty: none (the paper's recipe)."""
    augment_rate: float = 0.5
    """Variant rows per alignment row of each class, the kinds taking turns."""

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.full else 3e-4)

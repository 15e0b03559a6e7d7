"""Baseline checkpoints: refusal training without [CLS], saved as plain transformers models.

`ess train --method sft|augmented` trains the same base, data and budget as ESS, with no [CLS]
(see `ess.data.recovery`). Its final model is an ordinary causal LM folder (merged LoRA, or the
fully fine-tuned weights, and the base tokenizer) plus `ess_method.json`, which says how it was
trained. Having no `ess_config.json`, it is not an ESS checkpoint: `find_checkpoint` passes it
by, `load_model` and `resolve_base` load it as a base LM, and every command runs it plain.
"""

from __future__ import annotations

import json
from pathlib import Path

METHODS = ("ess", "sft", "augmented")
"""What `ess train --method` trains: ESS, or one of the baselines."""
METHOD_FILE = "ess_method.json"
"""Written into a baseline's final folder: the method, the base model and the adapter kind."""


def is_baseline(method: str) -> bool:
    return method != "ess"


def save_plain(model, folder: Path, method: str) -> None:
    """Write an `ESSModel` trained as a baseline as a plain causal LM: the LoRA adapter merged into
    the base weights, the base tokenizer (no [CLS]) with the chat template trained on."""
    from transformers import AutoTokenizer

    from .hub import resolve_base

    config = model.config
    lm = model.lm.merge_and_unload() if config.adapter == "lora" else model.lm
    lm.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(config.base_model))
    tokenizer.chat_template = model.tokenizer.chat_template  # the fallback template, where the base has none
    tokenizer.save_pretrained(folder)
    record = {"method": method, "base_model": config.base_model, "adapter": config.adapter}
    (folder / METHOD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_method(reference: str | Path) -> dict | None:
    """The `ess_method.json` of a baseline folder or run folder, or None where there is none."""
    for folder in (Path(reference), Path(reference) / "final"):
        if (folder / METHOD_FILE).is_file():
            return json.loads((folder / METHOD_FILE).read_text())
    return None

"""`ess export --merged DIR`: a plain Hugging Face checkpoint for serving engines, ESS beside it.

Layout of DIR:
    config.json, model.safetensors ...   the LM with the LoRA merged into its weights: what
                                          `AutoModelForCausalLM.from_pretrained`, vLLM or TGI load
    tokenizer files                       the base tokenizer, without [CLS]: a plain server must not
                                          map the text "[CLS]" to an id its embedding matrix lacks
    ess_config.json                       the ESS config, adapter kind `merged`
    ess_head.safetensors                  the [CLS] row and the head
    ess_tokenizer/                        the tokenizer with [CLS], which `ESSModel.from_pretrained` reads
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from .model import CONFIG_FILE, HEAD_FILE, ESSModel

ESS_TOKENIZER = "ess_tokenizer"


def export_merged(model: ESSModel, folder: str | Path) -> Path:
    """Write `model` as a merged checkpoint (see the module docstring); merges a LoRA in place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm = model.lm
    if hasattr(lm, "merge_and_unload"):
        # A model loaded for inference is merged already (ESSModel.merge_lora): only the wrapper goes.
        merged = any(getattr(layer, "merged", False) for layer in lm.modules() if hasattr(layer, "merged_adapters"))
        lm = lm.unload() if merged else lm.merge_and_unload()
    model.lm = lm
    model.config = dataclasses.replace(model.config, adapter="merged")
    lm.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder / ESS_TOKENIZER)
    model.tokenizer.save_pretrained(folder)
    _drop_added_token(folder, model.config.cls_token)
    model.config.save(folder / CONFIG_FILE)
    save_file(model.head_state(), folder / HEAD_FILE)
    return folder


def _drop_added_token(folder: Path, token: str) -> None:
    """Remove an added token from the tokenizer files in `folder` (it was added last, so no other id moves)."""
    path = folder / "tokenizer.json"
    if path.exists():
        data = json.loads(path.read_text())
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["content"] != token]
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    path = folder / "tokenizer_config.json"
    if path.exists():
        data = json.loads(path.read_text())
        decoder = data.get("added_tokens_decoder", {})
        data["added_tokens_decoder"] = {i: t for i, t in decoder.items() if t["content"] != token}
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(data.get(key), list):
                data[key] = [t for t in data[key] if t != token]
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")

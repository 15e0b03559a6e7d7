"""Weights and compute of a training run: fp32 master weights with bf16 compute for full fine-tuning.

Full fine-tuning updates every weight with AdamW at a small learning rate (2e-5); a bf16 weight
keeps 8 bits of mantissa, so an update smaller than 1/256 of the weight rounds away. The weights
therefore stay in fp32 (the master copy the optimizer updates) and only the forward and backward
passes run in bf16, under autocast (`accelerate`'s `mixed_precision="bf16"`). LoRA keeps what it
has: the frozen base in the loading dtype (`ess.model.default_dtype`: bf16 on CUDA and on CPUs
with native bf16) and peft's adapters in fp32.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16-mixed", "fp32")


class PrecisionError(ValueError):
    """A precision setting that cannot train correctly (the message says why)."""


def resolve(precision: str, full: bool, cuda: bool | None = None) -> str:
    """`bf16-mixed` or `fp32` for a full fine-tuning run (`auto`: bf16-mixed on CUDA), `lora` for LoRA."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if not full:
        return "lora"
    if precision == "auto":
        return "bf16-mixed" if (torch.cuda.is_available() if cuda is None else cuda) else "fp32"
    return precision


def weight_dtype(resolved: str) -> torch.dtype | None:
    """dtype to load the weights in: fp32 master weights for full fine-tuning, the default for LoRA."""
    return None if resolved == "lora" else torch.float32


def accelerate_mode(resolved: str) -> str:
    """`mixed_precision` of `accelerate.Accelerator`: bf16 autocast around the forward pass, or none."""
    return "bf16" if resolved == "bf16-mixed" else "no"


def check_master_weights(model: torch.nn.Module, full: bool) -> None:
    """Refuse full fine-tuning of weights held in a 16-bit dtype (their updates would round away)."""
    if not full:
        return
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if low:
        raise PrecisionError(
            f"full fine-tuning needs fp32 master weights, but trainable weights are {', '.join(low)}: "
            "load the model with dtype=torch.float32 (bf16 compute comes from precision bf16-mixed)"
        )

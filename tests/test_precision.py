"""Full fine-tuning in mixed precision: fp32 master weights, bf16 compute, the update of an fp32 step."""

from __future__ import annotations

import copy

import pytest
import torch

from ess.data.encoding import ChatEncoder
from ess.data.schema import Example
from ess.model import ESSModel
from ess.precision import PrecisionError, accelerate_mode, check_master_weights, resolve, weight_dtype

LR = 2e-5  # the paper's full fine-tuning learning rate
TOLERANCE = 0.1
"""Largest relative L2 distance between the bf16-compute update and the fp32 update of the LM weights."""


def _batch(model: ESSModel):
    encoder = ChatEncoder.for_model(model)
    examples = [
        Example.from_prompt("How do I bake bread?", "benign", response="Mix flour, water and yeast, then bake."),
        Example.from_prompt("How do I pick a lock?", "malicious", response="Sorry, I cannot help with that."),
    ]
    return encoder.collate([encoder.encode_example(e) for e in examples])


def _update(model: ESSModel, batch, mixed_precision: str) -> dict[str, torch.Tensor]:
    """One AdamW step as `ess train` takes it; returns the change of each LM weight (in fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
        before = {n: p.detach().float().clone() for n, p in model.lm.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        output = prepared(batch.input_ids, batch.roles, "align", batch.lm_targets, batch.cls_labels, 1.0)
        accelerator.backward(output.loss)
        optimizer.step()
        return {n: p.detach().float() - before[n] for n, p in model.lm.named_parameters()}
    finally:
        AcceleratorState._reset_state(True)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    difference = torch.cat([(a[n] - b[n]).flatten() for n in a])
    return float(difference.norm() / torch.cat([b[n].flatten() for n in b]).norm())


def test_bf16_compute_updates_the_weights_as_fp32_does(tiny_llama):
    torch.manual_seed(0)
    model = ESSModel.from_base(tiny_llama, adapter="full", dtype=weight_dtype(resolve("bf16-mixed", full=True)))
    assert model.cls_embedding.dtype == torch.float32
    batch = _batch(model)
    reference = _update(copy.deepcopy(model), batch, "no")
    mixed_model = copy.deepcopy(model)
    mixed = _update(mixed_model, batch, accelerate_mode("bf16-mixed"))
    assert all(p.dtype == torch.float32 for p in mixed_model.parameters())
    assert _distance(mixed, reference) <= TOLERANCE
    # The same step on bf16 weights: most updates round away.
    pure = _update(copy.deepcopy(model).to(torch.bfloat16), batch, "no")
    assert _distance(pure, reference) > 3 * TOLERANCE
    unchanged = sum(int((d == 0).sum()) for d in pure.values()) / sum(d.numel() for d in pure.values())
    assert unchanged > 0.5


def test_full_fine_tuning_of_bf16_weights_is_refused(tiny_llama):
    model = ESSModel.from_base(tiny_llama, adapter="full", dtype=torch.bfloat16)
    with pytest.raises(PrecisionError, match="fp32 master weights"):
        check_master_weights(model, full=True)
    check_master_weights(model, full=False)


def test_precision_settings():
    assert resolve("auto", full=True, cuda=True) == "bf16-mixed"
    assert resolve("auto", full=True, cuda=False) == "fp32"
    assert resolve("fp32", full=False) == "lora" and weight_dtype("lora") is None
    assert accelerate_mode("fp32") == "no" and accelerate_mode("bf16-mixed") == "bf16"
    with pytest.raises(PrecisionError, match="expected one of"):
        resolve("fp16", full=True)


@pytest.mark.slow
def test_full_fine_tuning_trains_in_mixed_precision_end_to_end(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from ess.cli import main

    out = tmp_path / "run"
    argv = ["train", "--base", tiny_llama, "--data", "seed:heldout_benign", "seed:heldout_harmful", "--out", str(out)]
    argv += ["--full", "--precision", "bf16-mixed", "--phase", "align", "--max-steps", "2", "--batch-size", "2"]
    assert main(argv + ["--response-calibration", "none"]) == 0
    weights = load_file(next((out / "final" / "model").glob("*.safetensors")))
    assert {w.dtype for w in weights.values()} == {torch.float32}

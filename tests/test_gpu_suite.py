"""The GPU check's CPU form: every schedule at each batch size, both training-step ratios, a table."""

from __future__ import annotations

import json

from ess.bench import SCHEDULES
from ess.gpu_suite import SuiteConfig, main, run_suite, table


def test_cpu_form_measures_every_part(default_model_dir, tmp_path):
    config = SuiteConfig(tiny=True, batch_sizes=(1, 2), max_new_tokens=4, train_steps=1, train_batch=2, train_length=16)
    result = run_suite(config, log=lambda line: None)
    rows = {(r["schedule"], r["batch"]) for r in result["bench"]["rows"]}
    assert {(s, b) for s in SCHEDULES for b in (1, 2)} <= rows
    assert all(r["tokens_per_s"] > 0 for r in result["bench"]["rows"])
    training = {r["adapter"]: r for r in result["training"]}
    assert set(training) == {"lora", "full"}
    assert all(r["ess_step_s"] > 0 and r["sft_step_s"] > 0 and r["peak_memory_gib"] > 0 for r in training.values())
    text = table(result)
    assert "| every | 2 |" in text and "ESS/SFT" in text
    json.dumps(result)


def test_full_form_without_a_gpu_is_one_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["--json", "unused.json"]) == 2
    assert "no CUDA device; run with --tiny" in capsys.readouterr().err

"""The response threshold calibrated from a model's answers to benign prompts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ess.calibration import CalibrationConfig, CalibrationError, calibrate_response_threshold, late_stop_score
from ess.generation import Policy, Request, Sampling, generate
from ess.model import ESSModel

PROMPTS = [
    "How do I bake sourdough bread?",
    "Explain photosynthesis to a child.",
    "Write a haiku about rain.",
    "What is a binary search?",
    "How do tides work?",
    "Suggest a name for a cat.",
    "How do I kill a stuck process on Linux?",
    "Summarise the plot of Hamlet.",
]


def test_late_stop_score_is_the_best_run_of_tau_consecutive_verdicts():
    assert late_stop_score([0.9, 0.95, 0.7, 0.99, 0.98, 0.97], tau=3) == 0.97
    assert late_stop_score([0.9, 0.95, 0.7, 0.99, 0.98, 0.97], tau=1) == 0.99
    assert late_stop_score([0.99, 0.99], tau=3) == 0.0  # too few verdicts ever to stop


def test_bad_calibration_settings_are_refused():
    with pytest.raises(CalibrationError, match="max_late_stop_rate"):
        CalibrationConfig(max_late_stop_rate=1.0)
    with pytest.raises(CalibrationError, match="floor"):
        CalibrationConfig(floor=0.0)


def _answers(model: ESSModel, policy: Policy) -> list:
    requests = [
        Request([{"role": "user", "content": p}], sampling=Sampling(max_new_tokens=16), policy=policy) for p in PROMPTS
    ]
    return generate(model, requests, batch_size=4)


@pytest.fixture()
def tiny_ess(tiny_llama) -> ESSModel:
    torch.manual_seed(0)  # the [CLS] row and head start random: the same ones whatever ran before
    model = ESSModel.from_base(tiny_llama).eval()
    model.config.threshold = 1.01  # every query verdict benign: every answer reaches rules 2 and 3
    return model


def test_calibrated_threshold_stops_at_most_the_allowed_answers_in_real_generation(tiny_ess, tmp_path):
    prompts = tmp_path / "benign.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    policy = Policy(tau=1)
    # A floor below every verdict: at the floor every answer would be stopped, so the threshold
    # must come from the answers.
    stopped_by_floor = CalibrationConfig(prompts=str(prompts), max_late_stop_rate=0.0, floor=0.01, max_new_tokens=16)
    tiny_ess.config.response_threshold = stopped_by_floor.floor
    assert all(g.intervened for g in _answers(tiny_ess, policy))

    result = calibrate_response_threshold(tiny_ess, stopped_by_floor, policy)
    assert result.answers == len(PROMPTS) and result.query_flagged == 0
    assert result.stopped_at_floor == len(PROMPTS) and result.stopped == 0
    assert tiny_ess.config.response_threshold == result.response_threshold > stopped_by_floor.floor
    assert not any(g.intervened for g in _answers(tiny_ess, policy))

    allowed = CalibrationConfig(prompts=str(prompts), max_late_stop_rate=0.25, floor=0.01, max_new_tokens=16)
    result = calibrate_response_threshold(tiny_ess, allowed, policy)
    assert result.stopped == 2  # 25 % of 8 answers
    assert sum(g.intervened for g in _answers(tiny_ess, policy)) == 2


def test_rounds_that_generate_only_changed_answers_calibrate_as_full_rounds(tiny_ess, tmp_path, monkeypatch):
    import dataclasses

    import ess.calibration as calibration

    prompts = tmp_path / "benign.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # A floor amid the answers' highest verdicts: the answers below it need no second generation.
    requests = [Request([{"role": "user", "content": p}], sampling=Sampling(max_new_tokens=16)) for p in PROMPTS]
    low = dataclasses.replace(Policy(tau=1), reliance="low", response_threshold=0.01)
    peaks = sorted(r.peak for r in calibration._read(tiny_ess, requests, low, 4))
    floor = (peaks[2] + peaks[3]) / 2
    config = CalibrationConfig(prompts=str(prompts), max_late_stop_rate=0.25, floor=floor, max_new_tokens=16)
    generated = []
    real_generate = calibration.generate

    def counting(model, requests, **kwargs):
        generated.append(len(requests))
        return real_generate(model, requests, **kwargs)

    monkeypatch.setattr(calibration, "generate", counting)
    fast = calibrate_response_threshold(tiny_ess, config, Policy(tau=1))
    fast_rounds = list(generated)
    generated.clear()
    monkeypatch.setattr(calibration._Reading, "holds_above", property(lambda self: False))
    full = calibrate_response_threshold(tiny_ess, config, Policy(tau=1))
    assert fast == full
    assert len(fast_rounds) == len(generated) > 1 and set(generated) == {len(PROMPTS)}
    assert sum(fast_rounds) < sum(generated)  # later rounds skip the answers no verdict touched


def test_ess_calibrate_writes_the_threshold_into_the_checkpoint(tiny_ess, tmp_path):
    tiny_ess.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "benign.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    command = [
        sys.executable,
        "-m",
        "ess.cli",
        "calibrate",
        "--model",
        str(tmp_path / "model"),
        "--prompts",
        str(prompts),
        "--floor",
        "0.01",
        "--max-late-stop-rate",
        "0",
        "--max-new-tokens",
        "16",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "model" / "ess_config.json").read_text())
    assert 0.01 < saved["response_threshold"] <= 1.0
    assert f"{saved['response_threshold']:.3f}" in result.stdout
    assert ESSModel.from_pretrained(tmp_path / "model").config.response_threshold == saved["response_threshold"]

    bad = subprocess.run(command[:-6] + ["--max-late-stop-rate", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "max_late_stop_rate must be in" in bad.stderr and "Traceback" not in bad.stderr

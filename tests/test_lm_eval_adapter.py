"""The lm-evaluation-harness model `ess`, offline on tiny local tasks (tests/data/lm_eval) and a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from ess.generation import Policy, Request, Sampling, generate  # noqa: E402
from ess.lm_eval_adapter import ESSLM  # noqa: E402
from ess.masks import Role  # noqa: E402
from ess.model import ESSModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def ess_checkpoint(tiny_llama, tmp_path_factory) -> str:
    """A tiny ESS model whose [CLS] head (random) flags about half the queries."""
    torch.manual_seed(1)
    model = ESSModel.from_base(tiny_llama)
    folder = tmp_path_factory.mktemp("tiny-ess")
    model.save_pretrained(folder)
    return str(folder)


def _training_forward_logprob(model: ESSModel, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one training-style forward: [CLS] + query + response."""
    ids = torch.tensor([[model.config.cls_token_id, *context, *continuation]])
    roles = torch.tensor(
        [[int(Role.CLS)] + [int(Role.QUERY)] * len(context) + [int(Role.RESPONSE)] * len(continuation)]
    )
    with torch.no_grad():
        logits = model.lm_logits(model(ids, roles).hidden_states)[0].float().log_softmax(-1)
    start = 1 + len(context)
    return sum(float(logits[start + j - 1, token]) for j, token in enumerate(continuation))


def test_loglikelihood_reads_cls_as_generation_does(ess_checkpoint):
    context = "Question: How many legs does a spider have?\nAnswer:"
    continuation = " It has eight legs, two more than an insect, and most spiders have eight eyes too."
    first = ESSLM(pretrained=ess_checkpoint, schedule="first")
    ctx, cont = first._encode_pair(context, continuation)
    assert len(cont) > 16
    (score, greedy), *_ = first._loglikelihood_tokens([((context, continuation), ctx, cont)])
    assert score == pytest.approx(_training_forward_logprob(first.model, ctx, cont), abs=1e-3)
    assert greedy is False

    # Re-evaluated [CLS] (every token, no minimum window): the later tokens read newer verdicts.
    every = ESSLM(pretrained=ess_checkpoint, schedule="every", min_window=1)
    ((rescored, _),) = every._loglikelihood_tokens([((context, continuation), ctx, cont)])
    assert abs(rescored - score) > 1e-3
    # Batched with other requests of other lengths, a request scores the same as alone.
    short = first._encode_pair("Question: Is ice cold?\nAnswer:", " yes")
    batch = every._loglikelihood_tokens([(("a", "b"), *short), ((context, continuation), ctx, cont)])
    assert batch[1][0] == pytest.approx(rescored, abs=1e-3)


def test_plain_models_score_as_transformers_does(tiny_llama):
    from transformers import AutoModelForCausalLM

    lm = ESSLM(pretrained=tiny_llama)
    assert lm.plain and lm.policy.schedule == "none"
    ctx, cont = lm._encode_pair("The capital of France is", " Paris, on the Seine.")
    ((score, _),) = lm._loglikelihood_tokens([(("x", "y"), ctx, cont)])
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    expected = sum(float(logits[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
    assert score == pytest.approx(expected, abs=1e-3)


def test_bad_model_args_are_one_clear_error(ess_checkpoint):
    with pytest.raises(ValueError, match="unknown model_args \\['temperature'\\]"):
        ESSLM(pretrained=ess_checkpoint, temperature="0.7")


def test_simple_evaluate_on_local_tasks(ess_checkpoint, monkeypatch, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    results = lm_eval.simple_evaluate(
        model="ess",
        model_args=f"pretrained={ess_checkpoint},batch_size=2",
        tasks=["ess_tiny_mc", "ess_tiny_gen", "ess_tiny_text"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        bootstrap_iters=0,
    )
    metrics = results["results"]
    assert 0.0 <= metrics["ess_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= metrics["ess_tiny_gen"]["exact_match,none"] <= 1.0
    assert metrics["ess_tiny_text"]["word_perplexity,none"] > 1.0
    assert len(results["samples"]["ess_tiny_mc"]) == 4

    # The answers of the generation task are those of guarded generation, cut at the stop string.
    from ess.generation import load_model

    model = load_model(ess_checkpoint)
    samples = sorted(results["samples"]["ess_tiny_gen"], key=lambda s: s["doc_id"])
    requests = [Request(messages=[], query=s["arguments"][0][0], sampling=Sampling(max_new_tokens=8)) for s in samples]
    expected = [g.text.split("\n")[0] for g in generate(model, requests)]
    assert [s["resps"][0][0] for s in samples] == expected
    assert requests[0].policy == Policy()

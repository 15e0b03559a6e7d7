"""The sidecar route against the fused loop on the default model, timed in one run: plain
generation followed by a separate [CLS] pass over every re-evaluation window, against the fused
ESS loop doing the same re-evaluations (docs/serving.md).

    PYTHONPATH=src python benchmarks/sidecar.py TOKENS SCHEDULE [SCHEDULE ...]
"""

import json
import sys
import time

import torch

from ess.bench import PROMPTS
from ess.data.encoding import ChatEncoder, Encoded
from ess.generation import Policy, Request, Sampling, generate
from ess.generation.policy import RowPolicy, validate
from ess.hub import DEFAULT_MODEL
from ess.masks import Phase, Role
from ess.model import ESSModel


def requests(schedule: str, tokens: int) -> list[Request]:
    return [
        Request(
            [{"role": "user", "content": p}],
            sampling=Sampling(max_new_tokens=tokens, ignore_eos=True),
            policy=Policy(schedule=schedule, reliance="low"),
        )
        for p in PROMPTS
    ]


def windows(model: ESSModel, encoder: ChatEncoder, answers, rows: list[Request]) -> list[list[int]]:
    """The token spans the fused loop's [CLS] re-evaluations read, for each answer."""
    spans = []
    for answer, request in zip(answers, rows):
        policy = RowPolicy(validate(request.policy), model.config.threshold, model.config.response_threshold)
        policy.first_verdict(0.0)
        query = encoder.query_ids(request.messages)
        for n in range(1, len(answer.token_ids) + 1):
            if policy.wants_reevaluation(n):
                span = policy.span(n)
                spans.append((query if span.query else []) + answer.token_ids[span.start : span.end])
                policy.observe(0.0, n)
    return spans


@torch.no_grad()
def classify_windows(model: ESSModel, encoder: ChatEncoder, spans: list[list[int]], batch: int = 32) -> None:
    for start in range(0, len(spans), batch):
        items = [
            Encoded(
                [model.config.cls_token_id] + s,
                [int(Role.CLS)] + [int(Role.RESPONSE)] * len(s),
                0,
                [False] * (len(s) + 1),
            )
            for s in spans[start : start + batch]
        ]
        padded = encoder.collate(items)
        model(padded.input_ids, padded.roles, Phase.PRETRAIN)


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    tokens, schedules = int(sys.argv[1]), sys.argv[2:]
    model = ESSModel.from_base(DEFAULT_MODEL, adapter="full").eval()
    encoder = ChatEncoder.for_model(model)
    generate(model, requests("every", 4)[:2], batch_size=2)  # warm-up
    plain_s, plain = seconds(lambda: generate(model, requests("none", tokens), batch_size=8))
    rows = {}
    for schedule in schedules:
        fused_s, _ = seconds(lambda s=schedule: generate(model, requests(s, tokens), batch_size=8))
        spans = windows(model, encoder, plain, requests(schedule, tokens))
        classify_s, _ = seconds(lambda w=spans: classify_windows(model, encoder, w))
        rows[schedule] = {
            "fused_s": fused_s,
            "plain_s": plain_s,
            "classify_s": classify_s,
            "windows": len(spans),
            "sidecar_over_fused": (plain_s + classify_s) / fused_s,
        }
        print(schedule, json.dumps(rows[schedule]), flush=True)
    print(json.dumps({"prompts": len(PROMPTS), "tokens": tokens, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()

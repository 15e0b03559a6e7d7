"""The first verdict of the [CLS] head on queries: the ESS model as a prompt guard."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.encoding import ChatEncoder
from .masks import Phase
from .model import ESSModel

Messages = list[dict[str, str]]


@dataclass
class Verdict:
    p_malicious: float
    label: str
    """`malicious` if p_malicious >= the model's threshold, else `benign`."""


def as_messages(query: str | Messages) -> Messages:
    return [{"role": "user", "content": query}] if isinstance(query, str) else query


@torch.no_grad()
def classify(model: ESSModel, queries: list[str | Messages], batch_size: int = 16) -> list[Verdict]:
    """p(malicious) of [CLS] + query (chat template and generation prompt included), batched."""
    encoder = ChatEncoder.for_model(model)
    verdicts: list[Verdict] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        items = [encoder.encode_query(as_messages(q)) for q in chunk]
        batch = encoder.collate(items).to(model.device)
        probabilities = model(batch.input_ids, batch.roles, Phase.ALIGN).p_malicious.tolist()
        verdicts += [Verdict(p, "malicious" if p >= model.config.threshold else "benign") for p in probabilities]
    return verdicts

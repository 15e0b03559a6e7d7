"""The decode loop: guarded generation for a batch of requests, each with its own policy and sampler.

Per step and row: the next token is a forced one (prefill, inserted guiding text or fixed
refusal) if any are queued, else sampled; the engine feeds it, re-evaluating [CLS] where the
row's schedule says so, over the span its strategic-attention rule picks; a verdict may queue
the guiding text (medium reliance) or the fixed refusal (high). Nothing already emitted is rolled
back: the record says how many tokens were shown before an intervention.
"""

from __future__ import annotations

from collections import deque

import torch
from tqdm import tqdm

from ..config import ESSConfig
from ..data.encoding import ChatEncoder
from ..model import ESSModel, find_checkpoint
from .engines import CachedEngine, ReferenceEngine
from .policy import INSERT, REFUSE, RowPolicy, validate
from .types import Generation, Request, Sampling, TraceEntry


class GenerationError(ValueError):
    """A request that cannot be generated (e.g. longer than the model's context)."""


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy, or temperature / top-k / top-p sampling (top-p 0 keeps only the top token)."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep tokens until top_p is reached
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probabilities = logits.softmax(-1).cpu()
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _eos_ids(model: ESSModel) -> set[int]:
    ids = {model.tokenizer.eos_token_id}
    configured = getattr(model.base_lm.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


class _Row:
    """Book-keeping of one request in the loop."""

    def __init__(self, index: int, request: Request, encoder: ChatEncoder, config: ESSConfig):
        self.request = request
        self.policy = RowPolicy(validate(request.policy), config.threshold, config.response_threshold)
        query = request.query
        self.query_ids = encoder.tokenize(query) if query is not None else encoder.query_ids(request.messages)
        self.forced: deque[int] = deque(encoder.tokenize(request.prefill) if request.prefill else [])
        self.emitted: list[int] = []
        self.generated = 0
        self.stop_after_forced = False
        self.done = False
        seed = request.sampling.seed if request.sampling.seed is not None else index
        self.generator = torch.Generator().manual_seed(seed)
        prompt = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        self.result = Generation(prompt=prompt, text="", token_ids=[], p_malicious=None, prefill=request.prefill)

    def intervene(self, action: str, encoder: ChatEncoder) -> None:
        """Queue the guiding text (or the fixed refusal) after what is already shown or forced."""
        shown = len(self.emitted) + len(self.forced)
        text = self.request.policy.guiding_text if action == INSERT else self.request.policy.refusal_text
        if shown:
            text = "\n" + text
        self.forced.extend(encoder.tokenize(text))
        self.stop_after_forced = action == REFUSE
        self.result.intervened = True
        self.result.intervention_step = shown
        self.result.tokens_before_intervention = shown

    def next_token(self, logits: torch.Tensor, eos: set[int]) -> int | None:
        """The token to feed, or None when the row has finished."""
        if self.forced:
            return self.forced.popleft()
        if self.stop_after_forced:
            return self._finish("refusal")
        if self.generated >= self.request.sampling.max_new_tokens:
            return self._finish("length")
        token = sample_token(logits, self.request.sampling, self.generator)
        self.generated += 1
        if token in eos and not self.request.sampling.ignore_eos:
            return self._finish("eos")
        return token

    def _finish(self, reason: str) -> None:
        self.done = True
        self.result.finish_reason = reason
        return None


def _run_batch(
    model: ESSModel, encoder: ChatEncoder, requests: list[Request], first_index: int, engine_class
) -> list[Generation]:
    rows = [_Row(first_index + i, r, encoder, model.config) for i, r in enumerate(requests)]
    extra = max(
        len(row.forced)
        + row.request.sampling.max_new_tokens
        + len(encoder.tokenize("\n" + max(row.request.policy.guiding_text, row.request.policy.refusal_text, key=len)))
        for row in rows
    )
    limit, what = model.context_limit
    for row in rows:
        needed = 1 + len(row.query_ids) + extra
        if limit is not None and needed > limit:
            raise GenerationError(
                f"request {rows.index(row) + first_index}: prompt of {len(row.query_ids)} tokens plus up to "
                f"{extra} response tokens exceeds the model's {what}"
            )
    engine = engine_class(model, [r.query_ids for r in rows], [r.policy.plain for r in rows], extra)
    eos = _eos_ids(model)

    logits, first_p = engine.start()
    for row, p in zip(rows, first_p.tolist()):
        if row.policy.plain:
            continue
        row.result.p_malicious = p
        row.result.trace.append(TraceEntry(step=0, p_malicious=p, span=(0, 0), rule=0))
        action = row.policy.first_verdict(p)
        if action:
            row.intervene(action, encoder)

    while True:
        tokens = [None if row.done else row.next_token(logits[i], eos) for i, row in enumerate(rows)]
        if all(t is None for t in tokens):
            break
        spans = []
        for row, token in zip(rows, tokens):
            if token is not None:
                row.emitted.append(token)
            n = len(row.emitted)
            wants = token is not None and not row.policy.plain and row.policy.wants_reevaluation(n)
            spans.append(row.policy.span(n) if wants else None)
        logits, ps = engine.step(tokens, spans)
        for row, span, p in zip(rows, spans, ps):
            if p is None:
                continue
            n = len(row.emitted)
            row.result.trace.append(TraceEntry(step=n, p_malicious=p, span=(span.start, span.end), rule=span.rule))
            action = row.policy.observe(p, n)
            if action:
                row.intervene(action, encoder)

    for row in rows:
        row.result.token_ids = row.emitted
        row.result.text = model.tokenizer.decode(row.emitted, skip_special_tokens=True)
    return [row.result for row in rows]


@torch.no_grad()
def generate(
    model: ESSModel, requests: list[Request], batch_size: int = 8, progress: bool = False, reference: bool = False
) -> list[Generation]:
    """Generate answers for requests, batched; results come back in the order of the requests.

    `reference=True` runs the exact from-scratch loop instead of the cached one (slow; for tests).
    """
    engine_class = ReferenceEngine if reference else CachedEngine
    encoder = ChatEncoder.for_model(model)
    # Similar lengths together: less padding per batch.
    order = sorted(
        range(len(requests)), key=lambda i: len(requests[i].query or encoder.render_query(requests[i].messages))
    )
    results: list[Generation | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="generate", unit="answer", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _run_batch(model, encoder, [requests[i] for i in chunk], chunk[0], engine_class)
        for index, generation in zip(chunk, batch):
            results[index] = generation
        bar.update(len(chunk))
    bar.close()
    return results


def load_model(reference: str) -> ESSModel:
    """An ESS checkpoint or run folder, or a base LM (name, folder or hub id) for plain generation."""
    folder = find_checkpoint(reference)
    if folder is not None:
        return ESSModel.from_pretrained(folder).eval()
    return ESSModel.from_base(reference, adapter="full").eval()


@torch.no_grad()
def next_token_logprobs(model: ESSModel, requests: list[Request]) -> torch.Tensor:
    """Log-probabilities [n, V] of the first token the model would choose after messages + prefill.

    The prefill is fed as response text reading the first verdict's [CLS] (no re-evaluation and
    no intervention: this measures the model's own next-token distribution, for the probe).
    """
    encoder = ChatEncoder.for_model(model)
    rows = []
    for request in requests:
        prefill = encoder.tokenize(request.prefill) if request.prefill else []
        engine = CachedEngine(
            model, [encoder.query_ids(request.messages)], [request.policy.schedule == "none"], len(prefill)
        )
        logits, _ = engine.start()
        for token in prefill:
            logits, _ = engine.step([token], [None])
        rows.append(logits[0].log_softmax(-1))
    return torch.stack(rows)

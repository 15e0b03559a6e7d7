"""The decode loop: guarded generation for a batch of requests, each with its own policy and sampler.

Per step and row: the next token is a forced one (prefill, inserted guiding text or fixed
refusal) if any are queued, else sampled; the engine feeds it, re-evaluating [CLS] where the
row's schedule says so, over the span its strategic-attention rule picks; a verdict may queue
the guiding text (medium reliance) or the fixed refusal (high). A token is released to the caller
once no verdict can withdraw it (`Policy.hold_back`); an intervention withdraws what is held,
rolls the engine back to the released tokens and inserts the text there. The record says how
many tokens were released before the intervention. A row that finishes leaves the batch, so each
step computes the live rows only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

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
        self.index = index
        self.request = request
        self.policy = RowPolicy(validate(request.policy), config.threshold, config.response_threshold)
        query = request.query
        self.query_ids = encoder.tokenize(query) if query is not None else encoder.query_ids(request.messages)
        self.forced: deque[int] = deque(encoder.tokenize(request.prefill) if request.prefill else [])
        self.prefill_len = len(self.forced)
        self.emitted: list[int] = []
        self.released = 0
        self.generated = 0
        self.stop_after_forced = False
        self.done = False
        seed = request.sampling.seed if request.sampling.seed is not None else index
        self.generator = torch.Generator().manual_seed(seed)
        prompt = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        self.result = Generation(prompt=prompt, text="", token_ids=[], p_malicious=None, prefill=request.prefill)

    def withdraw_held(self, engine, row: int) -> None:
        """Drop the generated tokens not released yet (kept as `withdrawn_token_ids`) and roll the
        engine back to the released ones."""
        if self.released < len(self.emitted):
            self.result.withdrawn_token_ids = self.emitted[self.released :]
            self.emitted = self.emitted[: self.released]
            engine.rollback(row, self.released)

    def intervene(self, action: str, encoder: ChatEncoder, engine, row: int) -> None:
        """Withdraw what is held, then queue the guiding text (or the fixed refusal) after what is
        released or forced."""
        self.withdraw_held(engine, row)
        shown = len(self.emitted) + len(self.forced)
        text = self.request.policy.guiding_text if action == INSERT else self.request.policy.refusal_text
        if shown:
            text = "\n" + text
        self.forced.extend(encoder.tokenize(text))
        self.stop_after_forced = action == REFUSE
        self.result.intervened = True
        self.result.intervention_step = shown
        self.result.tokens_before_intervention = shown

    def release(self, engine, row: int) -> list[int]:
        """The tokens that no verdict can withdraw any more and were not released yet (the prefill,
        the user's own text, at once)."""
        n = len(self.emitted)
        bound = n if self.done else max(min(n, self.prefill_len), self.policy.held_from(n))
        if bound <= self.released:
            return []
        new, self.released = self.emitted[self.released : bound], bound
        engine.forget(row, bound)
        return new

    def next_token(self, logits: torch.Tensor, eos: set[int]) -> int | None:
        """The token to feed, or None when the row has finished."""
        if self.forced:
            return self.forced.popleft()
        if self.stop_after_forced:
            return self.finish("refusal")
        if self.generated >= self.request.sampling.max_new_tokens:
            return self.finish("length")
        token = sample_token(logits, self.request.sampling, self.generator)
        self.generated += 1
        if token in eos and not self.request.sampling.ignore_eos:
            return self.finish("eos")
        return token

    def finish(self, reason: str) -> None:
        self.done = True
        self.result.finish_reason = reason
        return None

    def close(self, tokenizer) -> Generation:
        result = self.result
        result.token_ids = self.emitted
        result.text = tokenizer.decode(self.emitted, skip_special_tokens=True)
        result.withdrawn_text = tokenizer.decode(result.withdrawn_token_ids, skip_special_tokens=True)
        return result


Event = tuple[int, list[int], Generation | None]
"""(request index, newly released token ids, the generation on the request's last event)."""


def _run_batch(
    model: ESSModel,
    encoder: ChatEncoder,
    requests: list[Request],
    indices: list[int],
    engine_class,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[Event]:
    rows = [_Row(index, r, encoder, model.config) for index, r in zip(indices, requests)]
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
                f"request {row.index}: prompt of {len(row.query_ids)} tokens plus up to "
                f"{extra} response tokens exceeds the model's {what}"
            )
    holds = any(row.policy.may_withdraw for row in rows)
    engine = engine_class(model, [r.query_ids for r in rows], [r.policy.plain for r in rows], extra, versions=holds)
    eos = _eos_ids(model)

    logits, first_p = engine.start()
    for i, (row, p) in enumerate(zip(rows, first_p.tolist())):
        if row.policy.plain:
            continue
        row.result.p_malicious = p
        row.result.trace.append(TraceEntry(step=0, p_malicious=p, span=(0, 0), rule=0))
        action = row.policy.first_verdict(p)
        if action:
            row.intervene(action, encoder, engine, i)

    while True:
        tokens = []
        for i, row in enumerate(rows):
            stop = cancelled is not None and cancelled(row.index)
            token = row.finish("cancelled") if stop else row.next_token(logits[i], eos)
            if row.done and stop and row.policy.deferred:
                row.withdraw_held(engine, i)  # a cancelled deferral shows nothing it held
            elif row.done and row.policy.deferred:
                # The answer ended before its deferred verdict: the newest verdict decides now.
                action = row.policy.settle()
                if action:
                    row.done = False
                    row.intervene(action, encoder, engine, i)
                    token = row.next_token(logits[i], eos)
            tokens.append(token)
            if row.done:
                yield row.index, row.release(engine, i), None
                yield row.index, [], row.close(model.tokenizer)
        live = [i for i, t in enumerate(tokens) if t is not None]
        if not live:
            break
        if len(live) < len(rows):  # finished rows leave the batch
            engine.keep_rows(live)
            rows, tokens = [rows[i] for i in live], [tokens[i] for i in live]
        spans = []
        for row, token in zip(rows, tokens):
            row.emitted.append(token)
            n = len(row.emitted)
            wants = not row.policy.plain and row.policy.wants_reevaluation(n)
            spans.append(row.policy.span(n) if wants else None)
        logits, ps = engine.step(tokens, spans)
        for i, (row, span, p) in enumerate(zip(rows, spans, ps)):
            # Release first: the verdict of this pass may withdraw only what the hold keeps
            # (hold_back 0: nothing, the token fed with it included, as without hold-back).
            released = row.release(engine, i)
            if p is not None:
                n = len(row.emitted)
                row.result.trace.append(TraceEntry(step=n, p_malicious=p, span=(span.start, span.end), rule=span.rule))
                action = row.policy.observe(p, n)
                if action:
                    row.intervene(action, encoder, engine, i)
            if released:
                yield row.index, released, None


@torch.no_grad()
def events(
    model: ESSModel,
    requests: list[Request],
    batch_size: int = 8,
    reference: bool = False,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[Event]:
    """The decode loop's events for requests, batched by similar length; a request's default seed
    is its index here, whatever the batch. `cancelled(index)` ends that request's row early."""
    engine_class = ReferenceEngine if reference else CachedEngine
    encoder = ChatEncoder.for_model(model)
    # Similar lengths together: less padding per batch.
    order = sorted(
        range(len(requests)), key=lambda i: len(requests[i].query or encoder.render_query(requests[i].messages))
    )
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield from _run_batch(model, encoder, [requests[i] for i in chunk], chunk, engine_class, cancelled)


@torch.no_grad()
def generate(
    model: ESSModel, requests: list[Request], batch_size: int = 8, progress: bool = False, reference: bool = False
) -> list[Generation]:
    """Generate answers for requests, batched; results come back in the order of the requests.

    `reference=True` runs the exact from-scratch loop instead of the cached one (slow; for tests).
    """
    results: list[Generation | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="generate", unit="answer", disable=not progress)
    for index, _, generation in events(model, requests, batch_size, reference):
        if generation is not None:
            results[index] = generation
            bar.update(1)
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
    """Log-probabilities [n, V] of the first token the model would choose after messages + prefill,
    the requests in one batch.

    The prefill is fed as response text reading the first verdict's [CLS] (no re-evaluation and
    no intervention: this measures the model's own next-token distribution, for the probe).
    """
    encoder = ChatEncoder.for_model(model)
    prefills = [encoder.tokenize(r.prefill) if r.prefill else [] for r in requests]
    longest = max(map(len, prefills))
    engine = CachedEngine(
        model,
        [encoder.query_ids(r.messages) for r in requests],
        [r.policy.schedule == "none" for r in requests],
        longest,
    )
    logits, _ = engine.start()
    rows = list(logits)
    for step in range(longest):
        logits, _ = engine.step([p[step] if step < len(p) else None for p in prefills], [None] * len(requests))
        rows = [logits[i] if len(p) == step + 1 else row for i, (p, row) in enumerate(zip(prefills, rows))]
    return torch.stack(rows).log_softmax(-1)

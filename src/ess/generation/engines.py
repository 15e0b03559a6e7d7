"""Two ways to run the same decode loop: fast with a slot cache, or exact from scratch.

`CachedEngine` keeps one KV cache for the batch: slot 0 is [CLS], then the prefix all queries
share, then the rest of each query, left-padded, then one slot per decode step. A re-evaluation
of [CLS] is one extra query row in the forward pass of the next token; it overwrites slot 0 in
place, and the token of that same pass (and every later one) reads the new entry.

Rolling a row back (hold-back: withdrawn tokens) marks its withdrawn slots as padding, so that
nothing reads them, continues its positions from the kept tokens, and restores slot 0 to the
[CLS] version the kept tokens read; the row's later tokens take the next slots as before.

`ReferenceEngine` recomputes every step from nothing: each [CLS] version is a separate
position, each response token reads the version that was current when it was fed. It is slow
and simple, and the cached engine must match it (tests/test_generation.py).
"""

from __future__ import annotations

import os

import torch

from ..masks import Phase, Role, additive_mask, attention_allowed, position_ids
from ..model import ESSModel
from .cache import SlotCache
from .policy import Span


def auxiliary_ids(tokenizer) -> set[int]:
    """Tokens that re-evaluation spans skip (rule 4): BOS, EOS, PAD and chat-template markers."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _shared_prefix(query_ids: list[list[int]]) -> int:
    """Tokens every query begins with, leaving each query at least one token of its own."""
    return min(len(os.path.commonprefix(query_ids)), min(len(q) for q in query_ids) - 1)


class CachedEngine:
    share_prefill = True
    """Prefill identical rows, and the prefix every query shares, once (False: every row, for
    tests and benchmarks/shared_prefill.py)."""

    def __init__(
        self,
        model: ESSModel,
        query_ids: list[list[int]],
        plain: list[bool],
        capacity_after: int,
        versions: bool = False,
    ):
        """`versions`: keep each row's [CLS] entries (keys and values of slot 0) so that `rollback`
        can restore them."""
        self.model = model
        self.aux = auxiliary_ids(model.tokenizer)
        device = model.device
        b = len(query_ids)
        self.query_len = 1 + max(len(q) for q in query_ids)
        self.capacity = self.query_len + capacity_after
        width = self.query_len
        self.prefix_len = _shared_prefix(query_ids) if self.share_prefill and b > 1 else 0
        self.ids = torch.full((b, self.capacity), 0, dtype=torch.long, device=device)
        self.roles = torch.full((b, self.capacity), int(Role.PAD), dtype=torch.long, device=device)
        # Slot 0 is [CLS]; the prefix every query shares takes the next slots in every row, and the
        # rest of each query ends at `width` (padding between the two: positions skip it).
        prefix = self.prefix_len
        for row, (query, is_plain) in enumerate(zip(query_ids, plain)):
            self.ids[row, 1 : 1 + prefix] = torch.tensor(query[:prefix], dtype=torch.long, device=device)
            self.ids[row, width - len(query) + prefix : width] = torch.tensor(query[prefix:], device=device)
            self.roles[row, 1 : 1 + prefix] = int(Role.QUERY)
            self.roles[row, width - len(query) + prefix : width] = int(Role.QUERY)
            if not is_plain:  # a plain row has no [CLS]: nobody reads slot 0, so it is the base model
                self.ids[row, 0] = model.config.cls_token_id
                self.roles[row, 0] = int(Role.CLS)
        self.aux_ids = torch.tensor(sorted(self.aux), device=device)
        self.is_aux = torch.isin(self.ids, self.aux_ids)
        self.text_len = torch.tensor([len(q) for q in query_ids], device=device)
        self.cache = SlotCache(model.base_lm.config.num_hidden_layers, self.capacity)
        self.key_slots = torch.arange(self.capacity, device=device)
        self.steps = 0
        self.lengths = [0] * b  # response tokens each row holds
        self.history: list[list[tuple[int, tuple]]] | None = [[] for _ in range(b)] if versions else None

    def _forward(self, ids, roles, slots, positions, cls_reads=None, write=None, key_roles=None) -> torch.Tensor:
        key_roles = self.roles if key_roles is None else key_roles
        allowed = attention_allowed(roles, key_roles, Phase.ALIGN, slots, self.key_slots, cls_reads)
        embeds = self.model.embed(ids, roles)
        self.cache.target(slots, write)
        return self.model.decoder(
            inputs_embeds=embeds,
            attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state

    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill [CLS] + queries: next-token logits [b, V] and the first verdict p [b].

        Identical rows (one prompt under several attacks or sampling settings) are prefilled once
        and copied: a row's keys and values do not depend on the other rows of the batch. So is the
        prefix that every query shares (a chat template's system turn), which reads nothing else:
        it is prefilled as one row, and its keys and values copied into every row. Both equal a
        prefill of every row up to rounding (tests/test_generation.py)."""
        width, prefix = self.query_len, self.prefix_len
        distinct, copy_of = self._distinct_rows()
        query_slots = self.key_slots[:width]
        if prefix:
            shared = self.key_slots[1 : 1 + prefix]
            roles = self.roles[:1, shared]
            self._forward(self.ids[:1, shared], roles, shared, position_ids(roles), key_roles=self.roles[:1])
            self.cache.select_rows(torch.zeros_like(distinct))
            query_slots = torch.cat([query_slots[:1], query_slots[1 + prefix :]])
        roles = self.roles[distinct][:, query_slots]
        hidden = self._forward(
            self.ids[distinct][:, query_slots],
            roles,
            query_slots,
            position_ids(self.roles[distinct, :width])[:, query_slots],
            key_roles=self.roles[distinct],
        )
        if len(distinct) < len(copy_of):
            self.cache.select_rows(copy_of)
            hidden = hidden[copy_of]
        self._keep_versions(range(len(self.lengths)))
        return self.model.lm_logits(hidden[:, -1]).float(), self.model.verdict_logits(hidden[:, 0]).softmax(-1)[:, 1]

    def _distinct_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first row of each distinct query, the distinct query of each row) of the prefill."""
        width, device = self.query_len, self.model.device
        if not self.share_prefill:
            every = torch.arange(len(self.lengths), device=device)
            return every, every
        rows = [tuple(row) for row in torch.cat([self.ids[:, :width], self.roles[:, :width]], dim=1).tolist()]
        unique = list(dict.fromkeys(rows))  # in the order of first appearance
        distinct = torch.tensor([rows.index(row) for row in unique], device=device)
        return distinct, torch.tensor([unique.index(row) for row in rows], device=device)

    def _span_slots(self, spans: list[Span | None]) -> torch.Tensor:
        reads = torch.zeros_like(self.roles, dtype=torch.bool)
        for row, span in enumerate(spans):
            if span is None:
                continue
            if span.query:
                reads[row] |= self.roles[row] == Role.QUERY
            reads[row, self.query_len + span.start : self.query_len + span.end] = True
        return reads & ~self.is_aux & (self.roles != Role.PAD) & (self.roles != Role.CLS)

    def step(self, tokens: list[int | None], spans: list[Span | None]) -> tuple[torch.Tensor, list[float | None]]:
        """Feed one token per row (None: the row has finished) and re-evaluate [CLS] where a span is
        given. Returns next-token logits [b, V] and the new p(malicious) of re-evaluated rows."""
        device = self.model.device
        slot = self.query_len + self.steps
        active = torch.tensor([t is not None for t in tokens], device=device)
        self.ids[:, slot] = torch.tensor([t if t is not None else 0 for t in tokens], device=device)
        self.roles[:, slot] = torch.where(active, int(Role.RESPONSE), int(Role.PAD))
        self.is_aux[:, slot] = torch.isin(self.ids[:, slot], self.aux_ids)
        token_positions = (self.text_len + torch.tensor(self.lengths, device=device))[:, None]
        self.steps += 1
        self.lengths = [n + (t is not None) for n, t in zip(self.lengths, tokens)]

        reevaluate = torch.tensor([s is not None for s in spans], device=device)
        if not reevaluate.any():
            hidden = self._forward(
                self.ids[:, slot : slot + 1],
                self.roles[:, slot : slot + 1],
                self.key_slots[slot : slot + 1],
                token_positions,
            )
            return self.model.lm_logits(hidden[:, 0]).float(), [None] * len(tokens)

        # Two query rows per sequence: the new token, and [CLS] (a padding row where not re-evaluated).
        cls_role = torch.where(reevaluate, int(Role.CLS), int(Role.PAD))
        roles = torch.stack([self.roles[:, slot], cls_role], dim=1)
        ids = torch.stack([self.ids[:, slot], self.ids[:, 0]], dim=1)
        slots = torch.tensor([slot, 0], device=device)
        positions = torch.cat([token_positions, torch.zeros_like(token_positions)], dim=1)
        write = torch.stack([torch.ones_like(reevaluate), reevaluate], dim=1)
        hidden = self._forward(ids, roles, slots, positions, self._span_slots(spans), write)
        p = self.model.verdict_logits(hidden[:, 1]).softmax(-1)[:, 1].tolist()
        self._keep_versions([i for i, s in enumerate(spans) if s is not None])
        return self.model.lm_logits(hidden[:, 0]).float(), [
            p[i] if s is not None else None for i, s in enumerate(spans)
        ]

    def _keep_versions(self, rows) -> None:
        if self.history is None:
            return
        layers = self.cache.layers
        keys = torch.stack([layer.keys[:, :, 0] for layer in layers])
        values = torch.stack([layer.values[:, :, 0] for layer in layers])
        for row in rows:
            self.history[row].append((self.lengths[row], (keys[:, row], values[:, row])))

    def keep_rows(self, rows: list[int]) -> None:
        """Go on with the rows `rows` names only, renumbered in its order: finished rows leave the
        batch, so that later steps compute the live ones alone (a row's keys, values and verdicts do
        not depend on the other rows)."""
        index = torch.tensor(rows, device=self.model.device)
        self.ids, self.roles, self.is_aux = self.ids[index], self.roles[index], self.is_aux[index]
        self.text_len = self.text_len[index]
        self.lengths = [self.lengths[i] for i in rows]
        self.cache.select_rows(index)
        if self.history is not None:
            self.history = [self.history[i] for i in rows]

    def forget(self, row: int, kept: int) -> None:
        """No rollback of `row` will go below `kept` tokens: drop the [CLS] versions it cannot need."""
        if self.history is not None:
            versions = self.history[row]
            while len(versions) > 1 and versions[1][0] <= kept:
                versions.pop(0)

    def rollback(self, row: int, keep: int) -> None:
        """Withdraw `row`'s response tokens after the first `keep`: nothing reads them again, and
        [CLS] is the version current after token `keep` (needs `versions`). A rolled-back row is
        not re-evaluated again (spans index response tokens by slot)."""
        response = (self.roles[row] == Role.RESPONSE).nonzero().flatten()
        self.roles[row, response[keep:]] = int(Role.PAD)
        self.lengths[row] = keep
        keys, values = [v for v in self.history[row] if v[0] <= keep][-1][1]
        for layer, k, v in zip(self.cache.layers, keys, values):
            layer.keys[row, :, 0] = k
            layer.values[row, :, 0] = v


class ReferenceEngine:
    """One request at a time, everything recomputed at every step (slow; for tests). It takes
    CachedEngine's arguments so that either serves the generator; having no cache, it ignores
    `capacity_after`."""

    def __init__(
        self,
        model: ESSModel,
        query_ids: list[list[int]],
        plain: list[bool],
        capacity_after: int = 0,
        versions: bool = False,
    ):
        self.model = model
        self.aux = auxiliary_ids(model.tokenizer)
        self.queries = query_ids
        self.plain = plain
        self.responses: list[list[int]] = [[] for _ in query_ids]
        self.versions: list[list[tuple[int, Span | None]]] = [[(0, None)] for _ in query_ids]
        self.finished = [False] * len(query_ids)

    def _run(self, row: int) -> tuple[torch.Tensor, float]:
        """Full forward of one row: [CLS_0] + query + response + [CLS_1..m]; returns the logits after
        the last text token and p of the newest [CLS] version."""
        device = self.model.device
        query, response, versions = self.queries[row], self.responses[row], self.versions[row]
        n_text = len(query) + len(response)
        n = 1 + n_text + len(versions) - 1
        ids = (
            [self.model.config.cls_token_id] + query + response + [self.model.config.cls_token_id] * (len(versions) - 1)
        )
        roles = (
            [Role.CLS] + [Role.QUERY] * len(query) + [Role.RESPONSE] * len(response) + [Role.CLS] * (len(versions) - 1)
        )
        if self.plain[row]:
            roles[0] = Role.PAD
        cls_slot = [0] + [1 + n_text + v for v in range(len(versions) - 1)]
        reads = torch.zeros(1, n, n, dtype=torch.bool, device=device)
        reads_cls = torch.zeros(1, n, n, dtype=torch.bool, device=device)
        for version, (_created, span) in enumerate(versions):
            row_slot = cls_slot[version]
            if span is None:  # the first verdict: the query, exactly as in training
                reads[0, row_slot, 1 : 1 + len(query)] = True
                continue
            picked = [1 + i for i, t in enumerate(query) if span.query and t not in self.aux]
            picked += [1 + len(query) + j for j in range(span.start, span.end) if response[j] not in self.aux]
            reads[0, row_slot, picked] = True
        for j in range(len(response)):
            # Response token j (fed at step j) reads the newest version created at or before step j+1.
            version = max(v for v, (created, _) in enumerate(versions) if created <= j + 1)
            reads_cls[0, 1 + len(query) + j, cls_slot[version]] = True
        roles_t = torch.tensor([[int(r) for r in roles]], device=device)
        allowed = attention_allowed(roles_t, roles_t, Phase.ALIGN, cls_reads=reads, reads_cls=reads_cls)
        embeds = self.model.embed(torch.tensor([ids], device=device), roles_t)
        hidden = self.model.decoder(
            inputs_embeds=embeds,
            attention_mask=additive_mask(allowed, embeds.dtype),
            position_ids=position_ids(roles_t),
            use_cache=False,
        ).last_hidden_state[0]
        logits = self.model.lm_logits(hidden[n_text]).float()
        p = self.model.verdict_logits(hidden[cls_slot[-1]]).softmax(-1)[1].item()
        return logits, p

    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        results = [self._run(row) for row in range(len(self.queries))]
        return torch.stack([r[0] for r in results]), torch.tensor([r[1] for r in results])

    def keep_rows(self, rows: list[int]) -> None:
        """Go on with the rows `rows` names only, renumbered in its order."""
        for name in ("queries", "plain", "responses", "versions", "finished"):
            kept = getattr(self, name)
            setattr(self, name, [kept[i] for i in rows])

    def forget(self, row: int, kept: int) -> None:
        """Nothing to drop: the reference keeps every version anyway."""

    def rollback(self, row: int, keep: int) -> None:
        """As if the response had been `keep` tokens long: later tokens and verdicts never happened."""
        self.responses[row] = self.responses[row][:keep]
        self.versions[row] = [v for v in self.versions[row] if v[0] <= keep]

    def step(self, tokens: list[int | None], spans: list[Span | None]) -> tuple[torch.Tensor, list[float | None]]:
        logits, ps = [], []
        for row, (token, span) in enumerate(zip(tokens, spans)):
            if token is None:
                self.finished[row] = True
            if self.finished[row]:
                logits.append(torch.zeros(self.model.base_lm.config.vocab_size))
                ps.append(None)
                continue
            self.responses[row].append(token)
            if span is not None:
                self.versions[row].append((len(self.responses[row]), span))
            row_logits, p = self._run(row)
            logits.append(row_logits)
            ps.append(p if span is not None else None)
        return torch.stack(logits), ps

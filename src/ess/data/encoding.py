"""Examples -> token ids + token roles: the one place where [CLS] is put in front of a sequence.

A chat example becomes `[CLS] + query + response`: the query is the chat template applied to the
messages with the generation prompt (system and user turns, template tokens included), the
response is what the template adds after it for the assistant turn (its end-of-turn token
included, so that the model learns to stop). Plain text (the pretraining phase) becomes
`[CLS] + text`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..masks import Role
from .schema import LABELS, Example

# For base models without a chat template (e.g. Llama-2 base): a plain, documented format.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


@dataclass
class Encoded:
    """One tokenized sequence with the role of each token."""

    ids: list[int]
    roles: list[int]
    label: int
    """Class of the query (0 benign, 1 malicious)."""
    lm_target: list[bool]
    """Whether the token at each position is an LM target (its logits come from the position before)."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    roles: torch.Tensor
    lm_targets: torch.Tensor
    """[b, n]: the token to predict at each position, -100 where there is no LM loss."""
    cls_labels: torch.Tensor
    """[number of sequences]: the class of each, in the order of their [CLS] tokens."""
    segments: torch.Tensor | None = None
    """[b, n] of a packed batch (`ChatEncoder.pack`): the sequence of each token, numbered from 1;
    0 the prefix they share, -1 padding."""

    def to(self, device) -> Batch:
        moved = (self.input_ids, self.roles, self.lm_targets, self.cls_labels, self.segments)
        return Batch(*(None if t is None else t.to(device) for t in moved))


class ChatEncoder:
    def __init__(self, tokenizer, cls_token_id: int, cls_token: str = "[CLS]", max_length: int | None = None):
        self.tokenizer = tokenizer
        self.cls_token_id = cls_token_id
        self.cls_token = cls_token
        self.max_length = max_length
        if tokenizer.pad_token_id is not None:
            self.pad_id = tokenizer.pad_token_id
        else:
            self.pad_id = tokenizer.eos_token_id or 0
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE

    @classmethod
    def for_model(cls, model, max_length: int | None = None) -> ChatEncoder:
        """The encoder of an `ESSModel`: its tokenizer and its [CLS] token."""
        return cls(model.tokenizer, model.config.cls_token_id, model.config.cls_token, max_length)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text that may contain the literal string "[CLS]" without ever producing the
        [CLS] id: user text must not be able to inject a second safety token."""
        pieces = text.split(self.cls_token)
        literal = self.tokenizer(self.cls_token, add_special_tokens=False, split_special_tokens=True).input_ids
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids += literal
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to messages. A template that refuses a system turn (Gemma) gets
        the system text at the head of the first user turn instead."""
        from jinja2.exceptions import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError:
            if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
                raise
            merged = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
            return self.render([merged, *messages[2:]], add_generation_prompt)

    def render_query(self, messages: list[dict[str, str]]) -> str:
        return self.render(messages, add_generation_prompt=True)

    def query_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The query as the model sees it before answering (chat template + generation prompt)."""
        return self.tokenize(self.render_query(messages))

    def response_ids(
        self, messages: list[dict[str, str]], response: str, forced_prefix: str = ""
    ) -> tuple[list[int], int]:
        """Token ids of what the template adds after the query for the assistant's answer, and how
        many of them are a forced prefix.

        The answer's ids are those of the whole conversation after the query's ids, as the model
        reads them when it generates after the query (a template that has no generation prompt
        renders the same query; a sentencepiece tokenizer would add a spurious word boundary to a
        tail tokenized on its own). A forced prefix is tokenized on its own and placed right
        after the query, exactly as the generator inserts the guiding text; whitespace the template
        puts before the answer (`' ' + content` in Llama-2-chat and Mistral-Instruct) is left out
        there, since the generator does not insert it either (sentencepiece tokenizers mark the
        word boundary on the first token of the prefix by themselves)."""
        query = self.render_query(messages)
        full = self.render(messages + [{"role": "assistant", "content": response}])
        tail = full[len(query) :] if full.startswith(query) else response + (self.tokenizer.eos_token or "")
        at = tail.find(forced_prefix) if forced_prefix else -1
        if at >= 0 and not tail[:at].strip():
            forced = self.tokenize(forced_prefix)
            return forced + self.tokenize(tail[at + len(forced_prefix) :]), len(forced)
        if forced_prefix:
            raise ValueError(
                f"the chat template does not render the answer starting with its forced prefix {forced_prefix!r}"
            )
        query_ids, full_ids = self.tokenize(query), self.tokenize(query + tail)
        if full_ids[: len(query_ids)] == query_ids:
            return full_ids[len(query_ids) :], 0
        return self.tokenize(tail), 0

    def _finish(self, ids: list[int], roles: list[int], label: int, lm_target: list[bool]) -> Encoded:
        if self.max_length is not None:
            ids, roles, lm_target = ids[: self.max_length], roles[: self.max_length], lm_target[: self.max_length]
        return Encoded(ids=ids, roles=roles, label=label, lm_target=lm_target)

    def encode_query(self, messages: list[dict[str, str]], label: int = 0) -> Encoded:
        """[CLS] + query: what the head classifies before the first response token."""
        query = self.query_ids(messages)
        ids = [self.cls_token_id] + query
        roles = [int(Role.CLS)] + [int(Role.QUERY)] * len(query)
        return self._finish(ids, roles, label, [False] * len(ids))

    def encode_answer_start(self, messages: list[dict[str, str]], start: list[int], label: int) -> Encoded:
        """[CLS] + query + the first tokens of an answer, all read by [CLS]: the span a rule-1
        re-evaluation reads (docs/METHOD.md §4). No LM targets: the row carries the [CLS] loss alone."""
        head = self.encode_query(messages, label)
        return self._finish(
            head.ids + start, head.roles + [int(Role.QUERY)] * len(start), label, [False] * (len(head.ids) + len(start))
        )

    def encode_example(self, example: Example) -> Encoded:
        """[CLS] + query + response (alignment phase). LM targets are the response tokens, except a
        forced prefix (`meta["forced_prefix"]`, e.g. the guiding text that strategic decoding
        inserts), which the model reads but is not trained to produce."""
        head = self.encode_query(example.query, LABELS.index(example.label))
        response, forced = (
            self.response_ids(example.query, example.response, example.meta.get("forced_prefix", ""))
            if example.response
            else ([], 0)
        )
        return self._finish(
            head.ids + response,
            head.roles + [int(Role.RESPONSE)] * len(response),
            head.label,
            head.lm_target + [False] * forced + [True] * (len(response) - forced),
        )

    def encode_text(self, text: str, label: str, lm_loss: bool = True) -> Encoded:
        """[CLS] + plain text (pretraining phase). With `lm_loss`, every text token after the first
        is an LM target. No BOS: [CLS] reads the same kind of span it reads at generation time."""
        body = self.tokenize(text)
        ids = [self.cls_token_id] + body
        roles = [int(Role.CLS)] + [int(Role.RESPONSE)] * len(body)
        lm_target = [False, False] + [lm_loss] * (len(body) - 1)
        return self._finish(ids, roles, LABELS.index(label), lm_target[: len(ids)])

    def collate(self, items: list[Encoded]) -> Batch:
        """Right-pad a list of sequences into a batch (roles mark the padding)."""
        rows = [(item.ids, item.roles, _targets(item)) for item in items]
        return self._pad(rows, [item.label for item in items])

    def pack(self, items: list[Encoded], row_length: int, share_prefix: bool = True) -> Batch:
        """The sequences of a training step laid end to end in rows of up to `row_length` tokens
        (one sequence longer than that gets a row of its own), each row opening with the query
        tokens that follow [CLS] in every sequence (a chat template's system turn), once; not with
        `share_prefix` off (where dropout is on, each sequence must draw its own masks).

        The model computes on it what it computes on `collate`'s batch (`masks.attention_allowed`,
        `masks.position_ids`), without the padding, and with the shared prefix read once per row.
        Every sequence must open with [CLS]."""
        if any(item.roles[0] != Role.CLS for item in items):
            raise ValueError("pack: every sequence must open with [CLS]")
        targets = [_targets(item) for item in items]
        shared = _shared_query(items, targets) if share_prefix else 0
        prefix = [
            (token, role, -100, 0) for token, role in zip(items[0].ids[1 : 1 + shared], items[0].roles[1 : 1 + shared])
        ]
        rows: list[list[tuple[int, int, int, int]]] = []
        for number, (item, item_targets) in enumerate(zip(items, targets), start=1):
            tokens = list(zip(item.ids, item.roles, item_targets, [number] * len(item.ids)))
            piece = tokens[:1] + tokens[1 + shared :]  # [CLS], then what follows the prefix
            if not rows or len(rows[-1]) + len(piece) > row_length:
                rows.append(list(prefix))
            rows[-1].extend(piece)
        columns = [[list(column) for column in zip(*row)] for row in rows]
        return self._pad([row[:3] for row in columns], [item.label for item in items], [row[3] for row in columns])

    def _pad(self, rows: list[list[list[int]]], labels: list[int], segments: list[list[int]] | None = None) -> Batch:
        """Rows of (ids, roles, LM targets), right-padded into a batch; `segments` those of a packed one."""
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        roles = torch.full((len(rows), width), int(Role.PAD), dtype=torch.long)
        lm_targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (ids, row_roles, targets) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            roles[row, : len(ids)] = torch.tensor(row_roles)
            lm_targets[row, : len(ids)] = torch.tensor(targets)
        batch = Batch(input_ids, roles, lm_targets, torch.tensor(labels, dtype=torch.long))
        if segments is not None:
            batch.segments = torch.full((len(rows), width), -1, dtype=torch.long)
            for row, numbers in enumerate(segments):
                batch.segments[row, : len(numbers)] = torch.tensor(numbers)
        return batch


def _targets(item: Encoded) -> list[int]:
    """The token each position predicts (the logits at position t predict token t+1), -100 where
    there is no LM loss."""
    return [item.ids[t + 1] if item.lm_target[t + 1] else -100 for t in range(len(item.ids) - 1)] + [-100]


def _shared_query(items: list[Encoded], targets: list[list[int]]) -> int:
    """How many tokens right after [CLS] all sequences share: query tokens (which read no [CLS])
    up to the first position with an LM target (`targets`: `_targets` of each sequence), so that
    every target stays in its own sequence."""
    if len(items) < 2:
        return 0

    def shareable(item: Encoded, item_targets: list[int]) -> list[int]:
        count = 1
        while count < len(item.ids) and item.roles[count] == Role.QUERY and item_targets[count] == -100:
            count += 1
        return item.ids[1:count]

    return len(os.path.commonprefix([shareable(item, t) for item, t in zip(items, targets)]))

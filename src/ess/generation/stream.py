"""Streaming: each request's text as it clears every verdict that could withdraw it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..model import ESSModel
from .generator import events
from .types import Request, StreamEvent


class _Text:
    """Released token ids -> text deltas; waits while the text ends inside a character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def delta(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def generate_stream(
    model: ESSModel, requests: list[Request], batch_size: int = 8, cancelled: Callable[[int], bool] | None = None
) -> Iterator[StreamEvent]:
    """Released text per request as it clears, then one final event per request carrying its
    `Generation`; the deltas of a request add up to its `text`. `cancelled(index)` ends that
    request's row early (finish_reason `cancelled`), the others go on."""
    texts = [_Text(model.tokenizer) for _ in requests]
    for index, ids, generation in events(model, requests, batch_size, cancelled=cancelled):
        if generation is None:
            if text := texts[index].delta(ids):
                yield StreamEvent(index, text)
        else:
            yield StreamEvent(index, generation.text[len(texts[index].sent) :], generation)

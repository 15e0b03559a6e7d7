"""The one example schema every loader produces and every consumer reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Label = Literal["benign", "malicious"]
LABELS: tuple[str, ...] = ("benign", "malicious")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(part) for part in (source, line) if part is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field '{field}')" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")
        self.source, self.line, self.field = source, line, field


@dataclass
class Example:
    """One training or evaluation example.

    `query` holds the chat messages up to the assistant's answer (system and user turns, and earlier
    assistant turns of a multi-turn conversation); `response` is the assistant answer that follows,
    or None where a dataset has prompts only; `label` is the query's safety label.
    """

    query: list[dict[str, str]]
    response: str | None
    label: Label
    source: str = ""
    """Where the example came from (dataset name or file), for reports and error messages."""
    meta: dict = field(default_factory=dict)
    """Extra fields a dataset provides (category, refusal reason, AdvBench target, ...)."""

    @property
    def prompt(self) -> str:
        """The last user message: what a person would call the prompt."""
        return next(m["content"] for m in reversed(self.query) if m["role"] == "user")

    @classmethod
    def from_prompt(cls, prompt: str, label: Label, response: str | None = None, **kwargs) -> Example:
        return cls(query=[{"role": "user", "content": prompt}], response=response, label=label, **kwargs)


def validate_example(example: Example, source: str | None = None, line: int | None = None) -> Example:
    """Check an example against the schema; raise DataError naming the offending field."""
    if example.label not in LABELS:
        raise DataError(f"unknown label {example.label!r}, expected one of {', '.join(LABELS)}", source, line, "label")
    if not isinstance(example.query, list) or not example.query:
        raise DataError("query must be a non-empty list of chat messages", source, line, "query")
    for i, message in enumerate(example.query):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataError("each message needs exactly 'role' and 'content'", source, line, f"query[{i}]")
        if message["role"] not in ROLES:
            raise DataError(f"unknown role {message['role']!r}", source, line, f"query[{i}].role")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise DataError("message content must be a non-empty string", source, line, f"query[{i}].content")
    if example.query[-1]["role"] != "user":
        raise DataError("the last query message must be a user turn", source, line, "query")
    if example.response is not None and not isinstance(example.response, str):
        raise DataError("response must be a string", source, line, "response")
    return example

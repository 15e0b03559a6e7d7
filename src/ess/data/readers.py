"""File readers: each turns one data file into numbered records, reporting bad input with its line."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .schema import DataError

Record = dict[str, Any]
Reader = Callable[[Path], Iterable[tuple[int, Any]]]


def read_text(path: Path) -> str:
    """The whole file as text (gunzipped for .gz); bad bytes are reported with their line."""
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read file: {error}", str(path)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error.reason})", str(path), raw.count(b"\n", 0, error.start) + 1) from None
    if not text.strip():
        raise DataError("empty file", str(path))
    return text


def json_error(error: json.JSONDecodeError, path: Path, line: int) -> DataError:
    return DataError(f"invalid JSON: {error.msg} (column {error.colno})", str(path), line)


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for line, text in enumerate(read_text(path).split("\n"), 1):
        if text.strip():
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise json_error(error, path, line) from None
            yield line, record


def read_json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON list, numbered by 1-based item index; a single top-level object counts as item 1."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise json_error(error, path, error.lineno) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, found {type(data).__name__}", str(path))
    yield from enumerate(data, 1)


def read_csv(path: Path) -> Iterator[tuple[int, Record]]:
    """CSV with a header row; each record is numbered by the physical line it starts on."""
    rows = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [name.strip() for name in next(rows)]
        while True:
            line = rows.line_num + 1
            values = next(rows, None)
            if values is None:
                return
            if not values:  # blank line
                continue
            if len(values) != len(header):
                message = f"expected {len(header)} fields ({','.join(header)}), found {len(values)}"
                raise DataError(message, str(path), line)
            yield line, dict(zip(header, values))
    except csv.Error as error:
        raise DataError(f"malformed CSV: {error}", str(path), rows.line_num) from None


def read_lines(path: Path) -> Iterator[tuple[int, Record]]:
    for line, text in enumerate(read_text(path).split("\n"), 1):
        if text.strip():
            yield line, {"prompt": text.strip()}


def read_instruction_lists(path: Path) -> Iterator[tuple[int, Record]]:
    """Safety-Tuned LLaMAs evaluation files: one object {"instructions": [...], "tags"?: [...]}."""
    for line, obj in read_json(path):
        texts = obj.get("instructions") if isinstance(obj, dict) else None
        if not isinstance(texts, list):
            raise DataError("expected an object with a list of strings", str(path), line, "instructions")
        tags = obj.get("tags") or []
        for index, text in enumerate(texts):
            yield index + 1, {"prompt": text} | ({"tag": tags[index]} if index < len(tags) else {})

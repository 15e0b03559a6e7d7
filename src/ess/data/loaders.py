"""Dataset loaders: turn every supported input into a list of validated `Example`s.

Public API::

    load_examples(spec, *, label=None, limit=None) -> list[Example]
    load_prompts(spec, *, label=None, limit=None) -> list[str]   # the last user message of each
    seed_names() -> list[str]                                     # names usable as "seed:NAME"

`spec` is one of:

* ``seed`` (the bundled training data: ``seed/malicious_train.jsonl``, ``seed/benign_train.jsonl`` and
  ``seed/contrastive_train.jsonl``) or ``seed:NAME`` (``seed/NAME.jsonl``, e.g. ``seed:dev_harmful``;
  ``heldout_*`` still names the ``dev_*`` sets). Which set is for what: ``docs/data.md``;
* a file, or a directory holding exactly one data file. Known public formats are detected from the
  file name and the first record's keys:
    - AdvBench ``harmful_behaviors.csv`` and AutoDAN ``harmful_behaviors_autodan.csv`` (goal,target),
      ``harmful_strings.csv`` (target), headerless ``transfer_expriment_behaviors.csv``: malicious;
    - MaliciousInstruct ``MaliciousInstruct.txt`` (one prompt per line): malicious;
    - XSTest ``xstest_prompts.csv``: safe -> benign, unsafe -> malicious;
    - Alpaca-style JSON lists (``alpaca_data.json``, instructions-only ``alpaca.json``, LIMA
      ``lima.json`` with ``history``, AlpacaEval ``model_outputs.json``): benign;
    - Safety-Tuned LLaMAs ``safety_only_data_Instructions.json`` (harmful instruction + refusal) and
      ``evaluation/*.json`` (``{"instructions": [...]}``): malicious, except the benign
      ``I-PhysicalSafetySafe.json`` and ``I-Alpaca.json``;
    - Anthropic HH-RLHF ``*.jsonl.gz`` (chosen/rejected transcripts): malicious, the ``rejected``
      conversation with its final assistant turn as response;
    - DeepInception ``res/data_*.json``: malicious inception prompts (the ablation files
      ``data_abl_*`` and ``data_multi_scene`` give one prompt per entry of ``questions``);
    - MT-Bench ``question.jsonl``: benign, first turn;
* a generic ``.jsonl`` / ``.jsonl.gz`` / ``.json`` (list) / ``.csv`` file of rows with ``query``
  (chat messages) or ``prompt`` (aliases ``instruction``, ``goal``, ``question``), optional
  ``response`` (alias ``output``) and ``label``; Alpaca conventions apply (a non-empty ``input`` is
  appended to the prompt, ``history`` pairs become earlier turns); all other keys go into ``meta``.
  A generic ``.txt`` file holds one prompt per non-empty line;
* a hub dataset ``hub:ORG/NAME[:SPLIT]`` (or ``hub:ORG/NAME:CONFIG:SPLIT``), or a bare ``ORG/NAME``
  that is not an existing path; needs the optional ``datasets`` package and network access.

Labels: a row's own label wins; else the ``label`` argument; else the label the format implies.
Every bad input raises `DataError` naming the file, the line (the 1-based item index for JSON
lists) and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatch
from importlib.resources import as_file, files
from itertools import chain, islice
from pathlib import Path
from typing import Any, NamedTuple

from .readers import Reader, Record, read_csv, read_instruction_lists, read_json, read_jsonl, read_lines
from .schema import LABELS, DataError, Example, validate_example

__all__ = ["load_examples", "load_prompts", "seed_names"]

SEED_TRAIN = ("malicious_train", "benign_train", "contrastive_train")
SEED_ALIASES = {f"heldout_{name}": f"dev_{name}" for name in ("harmful", "benign", "benign_alarming")}
"""Former names of the dev sets (`seed:heldout_harmful` reads `seed:dev_harmful`)."""


def load_examples(spec: str | os.PathLike[str], *, label: str | None = None, limit: int | None = None) -> list[Example]:
    """Load the examples `spec` names (see the module docstring); `limit` keeps the first N."""
    spec = os.fspath(spec)
    if label is not None and label not in LABELS:
        raise DataError(f"unknown label argument {label!r}, expected one of {', '.join(LABELS)}", field="label")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    examples = list(islice(_load(spec, label), limit))
    if not examples and limit != 0:
        raise DataError("no examples found", spec)
    return examples


def load_prompts(spec: str | os.PathLike[str], *, label: str | None = None, limit: int | None = None) -> list[str]:
    """The prompts (last user message) of `load_examples(spec, ...)`."""
    return [example.prompt for example in load_examples(spec, label=label, limit=limit)]


def seed_names() -> list[str]:
    """Names of the bundled seed files, for `seed:NAME`."""
    seed = files("ess.data") / "seed"
    if not seed.is_dir():
        return []
    return sorted(entry.name.removesuffix(".jsonl") for entry in seed.iterdir() if entry.name.endswith(".jsonl"))


# --- spec dispatch -------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+){0,2}")


def _load(spec: str, label: str | None) -> Iterator[Example]:
    if spec == "seed" or spec.startswith("seed:"):
        names = [spec[5:]] if spec.startswith("seed:") else list(SEED_TRAIN)
        return chain.from_iterable(_load_seed(name, label) for name in names)
    if spec.startswith("hub:"):
        return _load_hub(spec[4:], label)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, label)
    # A missing "dir/file.csv" is a typo'd path, not a hub id.
    if _HUB_ID.fullmatch(spec) and _kind(path) is None:
        return _load_hub(spec, label)
    raise DataError(f"no such file or dataset: {spec!r}")


def _load_seed(name: str, label: str | None) -> Iterator[Example]:
    name = SEED_ALIASES.get(name, name)
    resource = files("ess.data") / "seed" / f"{name}.jsonl"
    if not resource.is_file():
        available = ", ".join(seed_names()) or "none yet"
        raise DataError(f"no such seed dataset {name!r} (available: {available})", f"seed:{name}")
    with as_file(resource) as path:  # a real file even if the package is zipped
        yield from _convert(read_jsonl(path), _FORMATS["jsonl"], str(path), label, f"seed:{name}")


def _load_path(path: Path, label: str | None) -> Iterator[Example]:
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_file() and _kind(p))
        if len(found) != 1:
            raise DataError(
                f"a directory must hold exactly one data file (.jsonl, .jsonl.gz, .json, .csv, .txt), "
                f"found {len(found)}: {', '.join(found) or 'none'}",
                str(path),
            )
        path = path / found[0]
    fmt = _FORMATS[_detect(path)]
    return _convert(fmt.read(path), fmt, str(path), label, str(path))


def _load_hub(ident: str, label: str | None) -> Iterator[Example]:
    """Load `ORG/NAME[:SPLIT]` or `ORG/NAME:CONFIG:SPLIT` with `datasets`, imported only here (optional)."""
    name, *parts = ident.split(":")
    config, split = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    source = f"hub:{ident}"
    try:
        import datasets
    except ImportError:
        raise DataError("the 'datasets' package is not installed (pip install datasets)", source) from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many types: connection, auth, unknown name/config/split
        raise DataError(
            f"cannot load hub dataset (no internet, unknown name/config/split, or gated?): "
            f"{type(error).__name__}: {error}",
            source,
        ) from error
    if split is None:  # a DatasetDict: take its first split
        data = next(iter(data.values()))
    fmt = _FORMATS["alert" if name.lower() == "babelscape/alert" else "hub"]
    return _convert(enumerate(data, 1), fmt, source, label, source)


# --- record -> rows in the generic schema --------------------------------------------------------

_XSTEST_LABELS = {"safe": "benign", "unsafe": "malicious"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ALERT_MARKERS = re.compile(r"^\s*### Instruction:\s*|\s*### Response:\s*$")


def _one(record: Record) -> list[Record]:
    return [record]


def _xstest(record: Record) -> list[Record]:
    # Unknown values pass through unchanged so that validation reports them on field 'label'.
    return [record | {"label": _XSTEST_LABELS.get(record["label"], record["label"])}]


def _unquote(record: Record) -> list[Record]:
    """Lines of a headerless CSV read as text: drop the CSV quoting of lines that have commas."""
    text = record["prompt"]
    if len(text) > 1 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('""', '"')
    return [{"prompt": text}]


def _transcript(text: str, field: str) -> list[dict[str, str]]:
    """An HH-RLHF "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as chat messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _Bad("expected a transcript of '\\n\\nHuman:' / '\\n\\nAssistant:' turns", field)
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # a few transcripts repeat a speaker: merge
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if messages[-1]["role"] != "assistant":
        raise _Bad("the transcript must end with an Assistant turn", field)
    return messages


def _hh_rlhf(record: Record) -> list[Record]:
    rejected = _transcript(record["rejected"], "rejected")
    chosen = _transcript(record["chosen"], "chosen")
    return [{"query": rejected[:-1], "response": rejected[-1]["content"], "chosen_response": chosen[-1]["content"]}]


def _as_prompt(key: str) -> Callable[[Record], list[Record]]:
    """A to_rows that makes field `key` the prompt and keeps the other fields (as meta)."""
    return lambda record: [{"prompt": record[key]} | {k: v for k, v in record.items() if k != key}]


def _deepinception_variants(record: Record) -> list[Record]:
    """DeepInception ablations: each of `questions` is a prompt variant (`inception_attack` is a template)."""
    rest = {key: value for key, value in record.items() if key != "questions"}
    return [{"prompt": question, **rest, "variant": i} for i, question in enumerate(record["questions"])]


def _mt_bench(record: Record) -> list[Record]:
    return [{"prompt": record["turns"][0], **record}]


def _alert(record: Record) -> list[Record]:
    return [record | {"prompt": _ALERT_MARKERS.sub("", record["prompt"])}]


# --- formats and detection -----------------------------------------------------------------------


class _Format(NamedTuple):
    read: Reader | None  # None for hub datasets, whose records come from `datasets`
    label: str | None = None  # the label the format implies, if it has no label column
    to_rows: Callable[[Record], list[Record]] = _one  # renames fields to the generic schema


_FORMATS: dict[str, _Format] = {
    # generic files: labels come from the rows or the label argument
    "jsonl": _Format(read_jsonl),
    "json": _Format(read_json),
    "csv": _Format(read_csv),
    "txt": _Format(read_lines),
    # public datasets (/work/shared/data/README.md)
    "advbench": _Format(read_csv, "malicious"),  # goal is a prompt alias, target goes to meta
    "harmful_strings": _Format(read_csv, "malicious", _as_prompt("target")),
    "prompt_lines": _Format(read_lines, "malicious"),
    "csv_lines": _Format(read_lines, "malicious", _unquote),
    "xstest": _Format(read_csv, None, _xstest),
    "alpaca": _Format(read_json, "benign"),
    "refusals": _Format(read_json, "malicious"),
    "instructions": _Format(read_instruction_lists, "malicious"),
    "benign_instructions": _Format(read_instruction_lists, "benign"),
    "hh_rlhf": _Format(read_jsonl, "malicious", _hh_rlhf),
    "deepinception": _Format(read_json, "malicious", _as_prompt("inception_attack")),
    "deepinception_variants": _Format(read_json, "malicious", _deepinception_variants),
    "mt_bench": _Format(read_jsonl, "benign", _mt_bench),
    "alert": _Format(None, "malicious", _alert),
    "hub": _Format(None),
}

# Files whose keys do not tell what they are; matched on the file name first.
_BY_NAME = {
    "MaliciousInstruct.txt": "prompt_lines",
    "transfer_expriment_behaviors.csv": "csv_lines",  # no header, and 2 lines have unquoted commas
    "harmful_strings.csv": "harmful_strings",
    "safety_only_data*.json": "refusals",  # same keys as Alpaca, but harmful requests
    "I-PhysicalSafetySafe.json": "benign_instructions",
    "I-Alpaca.json": "benign_instructions",
    "data_abl_*.json": "deepinception_variants",  # DeepInception ablations
    "data_multi_scene.json": "deepinception_variants",
}
# (file kind, keys the first record has, format); the first match wins, else the generic kind.
_BY_KEYS = [
    ("csv", {"goal", "target"}, "advbench"),
    ("csv", {"prompt", "label", "type", "focus"}, "xstest"),
    ("jsonl", {"chosen", "rejected"}, "hh_rlhf"),
    ("jsonl", {"question_id", "turns"}, "mt_bench"),
    ("json", {"instructions"}, "instructions"),
    ("json", {"inception_attack", "questions"}, "deepinception"),
    ("json", {"instruction", "output", "generator"}, "alpaca"),  # AlpacaEval
    ("json", {"instruction", "input", "output"}, "alpaca"),  # Alpaca, LIMA
    ("json", {"instruction", "category"}, "alpaca"),  # instructions-only Alpaca
]


_EXTENSIONS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".csv": "csv", ".txt": "txt"}


def _kind(path: Path) -> str | None:
    """The generic format of a file from its extension, or None if it is not a data file."""
    name = path.name.lower()
    return next((kind for ext, kind in _EXTENSIONS.items() if name.endswith(ext)), None)


def _detect(path: Path) -> str:
    kind = _kind(path)
    if kind is None:
        raise DataError("unsupported file type, expected .jsonl, .jsonl.gz, .json, .csv or .txt", str(path))
    by_name = next((fmt for pattern, fmt in _BY_NAME.items() if fnmatch(path.name, pattern)), None)
    if by_name:
        return by_name
    _, first = next(iter(_FORMATS[kind].read(path)), (0, None))
    keys = set(first) if isinstance(first, dict) else set()
    return next((fmt for k, needed, fmt in _BY_KEYS if k == kind and needed <= keys), kind)


# --- rows -> Examples ----------------------------------------------------------------------------

_PROMPT_KEYS = ("prompt", "instruction", "goal", "question")
_RESPONSE_KEYS = ("response", "output")


class _Bad(Exception):
    """A bad row; `_convert` adds the file and line and raises it as DataError."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


def _convert(
    records: Iterable[tuple[int, Any]], fmt: _Format, path: str, label: str | None, source: str
) -> Iterator[Example]:
    """Records -> validated Examples; `path` is for error messages, `source` for `Example.source`."""
    for line, record in records:
        try:
            if not isinstance(record, dict):
                raise _Bad(f"expected an object, found {type(record).__name__}")
            examples = [_to_example(row, label or fmt.label, source) for row in fmt.to_rows(record)]
        except DataError:
            raise
        except _Bad as error:
            raise DataError(error.message, path, line, error.field) from None
        except KeyError as error:
            raise DataError("missing field", path, line, str(error.args[0])) from None
        except (TypeError, ValueError, IndexError, AttributeError) as error:
            raise DataError(f"malformed record: {error}", path, line) from None
        for example in examples:
            yield validate_example(example, source=path, line=line)


def _to_example(row: Record, default_label: str | None, source: str) -> Example:
    """Build an Example from a row in the generic schema; unrecognised keys go into `meta`."""
    row = dict(row)
    if "query" in row:
        query = row.pop("query")
    else:
        key = next((key for key in _PROMPT_KEYS if key in row), None)
        if key is None:
            raise _Bad(f"missing prompt: expected 'query' or one of {', '.join(map(repr, _PROMPT_KEYS))}", "prompt")
        prompt = row.pop(key)
        if not isinstance(prompt, str):
            raise _Bad(f"expected a string, found {type(prompt).__name__}", key)
        if row.get("input"):  # Alpaca: the input follows the instruction after a blank line
            prompt = f"{prompt}\n\n{row.pop('input')}"
        row.pop("input", None)
        query = [*_history(row.pop("history", None) or []), {"role": "user", "content": prompt}]
    response_key = next((key for key in _RESPONSE_KEYS if key in row), None)
    response = (row.pop(response_key) or None) if response_key else None
    label = row.pop("label", None) or default_label
    if label is None:
        raise _Bad("no label: the data has none, so pass label='benign' or label='malicious'", "label")
    return Example(query=query, response=response, label=label, source=source, meta=row)


def _history(pairs: Any) -> list[dict[str, str]]:
    """LLaMA-Factory alpaca `history`: [[user, assistant], ...] earlier turns."""
    try:
        return [
            {"role": role, "content": content}
            for user, assistant in pairs
            for role, content in (("user", user), ("assistant", assistant))
        ]
    except (TypeError, ValueError):
        raise _Bad("expected a list of [user, assistant] pairs", "history") from None

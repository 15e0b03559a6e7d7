"""The run folder's JSONL files: append-only logs that survive an interrupted write."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..attacks import Attack, AttackContext, AttackedInput
from ..data.schema import Example
from ..generation.types import Sampling
from .config import EvalError

RecordKey = tuple[str, str, str, str, int]


def record_key(record: dict) -> RecordKey:
    return (record["model"], record["task"], record["attack"], record["config"], record["index"])


class JsonlLog:
    """An append-only JSONL file that survives an interrupted write (a cut last line is dropped)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        if path.exists():
            lines = path.read_text(encoding="utf-8").split("\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if any(rest.strip() for rest in lines[number:]):
                        raise EvalError(f"{path}:{number}: not a JSON line; is this an ess eval folder?") from None
                    self.rewrite()

    def add(self, rows: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows

    def rewrite(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, self.path)


def eval_records(folder: str | Path) -> list[dict]:
    """The records of an `ess eval` output folder, read as a resumed run reads them."""
    path = Path(folder) / "records.jsonl"
    if not path.is_file():
        raise EvalError(f"{folder}: no records.jsonl; is this an ess eval folder?")
    return JsonlLog(path).rows


class RecordStore(JsonlLog):
    """`records.jsonl`, appended to as answers come in; knows which records are finished."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.keys = {record_key(r) for r in self.rows}

    def add(self, records: list[dict]) -> None:
        super().add(records)
        self.keys.update(record_key(r) for r in records)


class CostlyInputs(JsonlLog):
    """`attacked_inputs.jsonl`: the inputs of costly attacks (GCG), written as each is built, so
    that a resumed run reuses them instead of optimising again."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.built = {(r["model"], r["task"], r["attack"], r["index"]): r["inputs"] for r in self.rows}

    def build(
        self, model: str, task: str, attack: Attack, index: int, example: Example, ctx: AttackContext
    ) -> list[AttackedInput]:
        if not attack.costly:
            return attack.build(example, ctx)
        key = (model, task, attack.spec, index)
        if key not in self.built:
            inputs = [dataclasses.asdict(i) for i in attack.build(example, ctx)]
            self.add([{"model": model, "task": task, "attack": attack.spec, "index": index, "inputs": inputs}])
            self.built[key] = inputs
        return [AttackedInput(**{**i, "sampling": Sampling(**i["sampling"])}) for i in self.built[key]]

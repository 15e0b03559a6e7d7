"""Token lengths of the training queries and of the attack inputs with the default tokenizer
(docs/experiments.md, training max_length): `PYTHONPATH=src python benchmarks/token_lengths.py`."""

from pathlib import Path

from transformers import AutoTokenizer

from ess.attacks import AttackContext, get_attack
from ess.data.encoding import ChatEncoder
from ess.data.recipe import load_sources
from ess.hub import DEFAULT_MODEL, resolve_base

ATTACKS = ("direct", "deepinception", "autodan", "pap", "past-tense")


def summary(lengths: list[int], name: str) -> None:
    xs, n = sorted(lengths), len(lengths)

    def pct(p: float) -> int:
        return xs[min(n - 1, int(p * n))]

    print(
        f"{name:28s} n={n:4d} median={pct(0.5):5d} p90={pct(0.9):5d} p99={pct(0.99):5d} max={xs[-1]:5d} "
        f">160: {sum(x > 160 for x in xs) / n:6.1%}"
    )


tokenizer = AutoTokenizer.from_pretrained(resolve_base(DEFAULT_MODEL))
tokenizer.add_tokens(["[CLS]"], special_tokens=True)
encoder = ChatEncoder(tokenizer, tokenizer.convert_tokens_to_ids("[CLS]"))
examples = load_sources(["seed"])
summary([1 + len(encoder.query_ids(e.query)) for e in examples], "seed queries ([CLS]+query)")
malicious = [e for e in examples if e.label == "malicious"][:60]
context = AttackContext(tokenizer=tokenizer, data_root=Path("/work/shared/data"))
for name in ATTACKS:
    attack = get_attack(name)
    summary([1 + len(encoder.query_ids(a.messages)) for e in malicious for a in attack.build(e, context)], name)

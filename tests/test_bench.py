"""`ess bench` on a tiny model: one row per schedule and batch, the hold-back pair, and transformers' speed."""

from __future__ import annotations

from ess.bench import SCHEDULES, BenchConfig, run_bench
from ess.model import ESSModel


def test_bench_measures_every_schedule_against_none(tiny_llama):
    model = ESSModel.from_base(tiny_llama).eval()
    result = run_bench(model, BenchConfig(batch_sizes=(1, 2), max_new_tokens=6, repeats=2))
    rows = result["rows"]
    assert [(r["schedule"], r["batch"]) for r in rows] == [
        (name, batch) for batch in (1, 2) for name in (*SCHEDULES, "annealing, hold-back 10 vs 0")
    ]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["overhead"] == 0 for r in rows if r["schedule"] == "none")
    assert set(result["hf_generate_tokens_per_s"]) == {"1", "2"}
    assert result["settings"]["dtype"] == "torch.float32"

"""``bench/standing.py`` at its smallest, on each ledger backend: it fills, times both ways
and finds them equal (it exits if the incremental standing differs from the full queries)."""

from __future__ import annotations

from coordinator.ledger import Ledger
from tests.bench_module import load_bench


def test_the_standing_bench_times_both_ways_and_they_agree(ledger: Ledger) -> None:
    out = load_bench("standing").measure(ledger, nodes=30, updates=10, steps=2)
    assert out["nodes"] == 30 and out["steps"] == 2
    assert out["full_ms"] > 0 and out["incremental_ms"] > 0 and out["speedup"] > 0
    assert out["probation"] > 0  # every 50th update lost a check: some nodes serve probation

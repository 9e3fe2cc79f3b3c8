"""A small ``bench/scale.py`` run on each ledger backend: the real asynchronous loop, verifier
and ledger with many in-process nodes finish the run with every lease accounted for."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _scale():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import scale
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return scale


def test_many_nodes_finish_with_every_lease_accounted_for(ledger_url: str,
                                                              tmp_path: Path) -> None:
    nodes = 60 if ledger_url.startswith("sqlite") else 30  # PostgreSQL: the same, smaller
    out = _scale().run(nodes, 3, ledger_url, tmp_path, institutions=10)
    assert out["version"] == 3  # every outer step made
    assert out["leases_issued"] >= 3 * nodes  # K = the nodes online per step
    assert out["leases_accounted"] == out["leases_issued"]
    assert out["lease_statuses"].get("issued", 0) == 0
    assert out["updates_accepted"] >= 3 * nodes * 0.8  # honest nodes: nearly all accepted
    # latency is measured (its bound is the benchmark's business, not a timed test's)
    assert 0 < out["lease_p50_ms"] <= out["lease_p99_ms"] <= out["lease_max_ms"]
    # the replies' own checks ran in the checker process beside the loop, not in it
    assert out["check_processes"] == 1 and out["time_s"]["checker"] > 0
    assert out["time_s"]["checks"] < out["time_s"]["checker"]

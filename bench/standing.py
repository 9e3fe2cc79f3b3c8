"""What the run loop pays, after each outer step, to know every node's trust and probation.

Fills a ledger with ``--nodes`` nodes x ``--updates`` train updates each (a run that has done
about that many steps at one update per node per step), then, for ``--steps`` more steps of
one new update per node, times after each:

- ``full_ms``: ``Ledger.node_summaries()`` + ``lost_spot_check_within(PROBATION_UPDATES)``,
  the two queries the loop ran after every step until session 10 (they aggregate the whole
  ledger: their cost grows with the run);
- ``incremental_ms``: ``coordinator.run.standing.Standing.refresh()`` (the rows since the
  last refresh), warmed by one refresh over the whole ledger (what a loop pays once, at start).

Both give the same trust and probation (checked here, and by tests/ledger/test_standing.py).

    python bench/standing.py                           # SQLite, 1,000 nodes x 200 updates
    python bench/standing.py --ledger postgresql --json
    python bench/standing.py --updates 1000 --json     # a longer run

Run on demand; ``--json`` prints one object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from coordinator.ledger import Ledger  # noqa: E402
from coordinator.run.standing import Standing  # noqa: E402
from coordinator.verify.trust import NEW_NODE_TRUST, PROBATION_UPDATES  # noqa: E402
from pg_schema import bench_ledger_url  # noqa: E402

_BATCH = 20_000  # rows per insert while filling


def _answer(ledger: Ledger, node_ids: list[int], n: int, seq: list[int]) -> None:
    """``n`` train updates, round-robin over the nodes, every 50th a lost spot check."""
    for at in range(0, n, _BATCH):
        m = min(_BATCH, n - at)
        owners = [node_ids[(at + j) % len(node_ids)] for j in range(m)]
        lease_ids = ledger.record_leases([
            dict(run_id="r", round=1, shard_id=j, kind="train", node_id=o, base_version=0,
                 nonce=f"{seq[0] + j:032x}", data_start=0, data_end=8, deadline=1.0,
                 issued_at=1.0) for j, o in enumerate(owners)])
        seq[0] += m
        lost = [(seq[0] + j) % 50 == 0 for j in range(m)]
        ledger.record_updates([
            dict(lease_id=lid, node_id=o, arrays_digest="ab" * 32,
                 verdict="rejected" if bad else "accepted",
                 reason="spot_check_mismatch" if bad else None, tokens=1024, steps=4,
                 loss_before=5.0, loss_after=4.5, wall_s=1.0, received_at=2.0)
            for lid, o, bad in zip(lease_ids, owners, lost)], lambda i, uid: None)


def measure(ledger: Ledger, nodes: int, updates: int, steps: int) -> dict:
    """The timings of the module docstring on ``ledger`` (empty), medians over ``steps``."""
    inst = ledger.add_institution("University A")
    node_ids = [ledger.add_node(10_000 + i, f"node-{i}", inst.id, "pem", f"{i:016x}").id
                for i in range(nodes)]
    seq = [0]
    t0 = time.perf_counter()
    _answer(ledger, node_ids, nodes * updates, seq)
    fill_s = time.perf_counter() - t0
    standing = Standing(ledger)
    t0 = time.perf_counter()
    standing.refresh()
    first_s = time.perf_counter() - t0
    full, incremental = [], []
    for _ in range(steps):
        _answer(ledger, node_ids, nodes, seq)  # one outer step's verdicts
        t0 = time.perf_counter()
        trust = {s.node_id: s.trust for s in ledger.node_summaries()}
        probation = ledger.lost_spot_check_within(PROBATION_UPDATES)
        full.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        standing.refresh()
        mine, on_probation = standing.trust(), standing.probation()
        incremental.append(1000 * (time.perf_counter() - t0))
        if {n: mine.get(n, NEW_NODE_TRUST) for n in trust} != trust \
                or on_probation != probation:
            raise SystemExit("the incremental standing differs from the full queries")
    full_ms, inc_ms = statistics.median(full), statistics.median(incremental)
    return {"nodes": nodes, "updates_per_node": updates, "steps": steps,
            "fill_s": round(fill_s, 1), "first_refresh_s": round(first_s, 3),
            "full_ms": round(full_ms, 2), "incremental_ms": round(inc_ms, 2),
            "speedup": round(full_ms / inc_ms, 1), "probation": len(on_probation)}


def run(kind: str, nodes: int, updates: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="atom-standing-") as tmp, \
            bench_ledger_url(kind, Path(tmp), "standing") as url, Ledger(url) as ledger:
        return {"ledger": kind, **measure(ledger, nodes, updates, steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ledger", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--updates", type=int, default=200, help="updates per node before timing")
    p.add_argument("--steps", type=int, default=5, help="outer steps timed (medians)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = run(a.ledger, a.nodes, a.updates, a.steps)
    print(f"{out['ledger']}: {a.nodes} nodes x {a.updates} updates: after a step, the full "
          f"queries {out['full_ms']:.1f} ms, the incremental refresh "
          f"{out['incremental_ms']:.1f} ms ({out['speedup']}x); its first refresh "
          f"{out['first_refresh_s']:.2f} s", file=sys.stderr)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()

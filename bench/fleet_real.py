"""A mixed fleet of real processes on loopback: lock-step rounds against the asynchronous loop.

``bench/fleet.py`` measures the loops in simulated time; this runs the real thing — the
demo's coordinator, SuperLink and ``atom-node join`` nodes with their warm workers, TLS and
signed updates — with the nodes throttled to different speeds (``--slowdown``: a node waits
after each lease so that it takes F times as long, as a slower device would, and reports
that time). Both runs size leases to each node (``target_lease_s``) and train the same
model; the lock-step run does ``--rounds`` rounds, the asynchronous one twice as many outer
steps. Reported: wall seconds, the seconds until a version reaches the lock-step run's final
validation loss (``speedup``), validation loss per version with its train tokens, and each
node's utilization (its reported work seconds over the run's wall).

    python bench/fleet_real.py                      # slowdowns 1,2,4, 3 rounds
    python bench/fleet_real.py --slowdowns 1,3 --rounds 4 --json

Run on demand (a few minutes on 2 cores); not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.demo import run_demo  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402


def run(asynchronous: bool, slowdowns: list[float], rounds: int, inner_steps: int,
        lease_s: float, workdir: Path, console: Console) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "train_inner_steps": inner_steps, "train_target_lease_s": lease_s,
        "train_min_inner_steps": 10, "train_deadline_slack_s": 60.0,
        "data_eval_tokens": 8192,
    }
    if asynchronous:
        overrides["async_enabled"] = True
    node_args = {i: ["--slowdown", str(f)] for i, f in enumerate(slowdowns) if f != 1}
    t0 = time.time()
    summary, status = run_demo(nodes=len(slowdowns), rounds=rounds, workdir=workdir,
                               console=console, overrides=overrides, node_args=node_args)
    with Ledger(summary["ledger"]) as ledger:
        leases = ledger.leases()
        start = min(x.issued_at for x in leases)
        end = max(x.closed_at or x.issued_at for x in leases)
        busy: dict[int, float] = {}
        for u in ledger.updates():
            busy[u.node_id] = busy.get(u.node_id, 0.0) + (u.wall_s or 0.0)
        names = {n.id: n.name for n in ledger.nodes()}
        tokens, curve = 0, []
        for v in ledger.versions():
            tokens += v.tokens
            curve.append((round(max(0.0, v.created_at - start), 1), tokens, v.val_loss))
    wall = end - start
    util = {names[n]: round(min(1.0, s / wall), 3) for n, s in sorted(busy.items())}
    return {"status": status, "wall_s": round(wall, 1), "seconds": round(time.time() - t0, 1),
            "utilization": util, "utilization_min": min(util.values()), "curve": curve,
            "val_loss": curve[-1][2]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slowdowns", default="1,2,4", help="per node: how many times slower")
    p.add_argument("--rounds", type=int, default=3, help="lock-step rounds")
    p.add_argument("--inner-steps", type=int, default=40, help="a node's first lease")
    p.add_argument("--lease-s", type=float, default=8.0, help="[train] target_lease_s")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    slowdowns = [float(x) for x in a.slowdowns.split(",")]
    console = Console(stderr=True)
    out: dict[str, Any] = {"slowdowns": slowdowns, "rounds": a.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, steps in (("lockstep", a.rounds), ("async", 2 * a.rounds)):
            out[mode] = run(mode == "async", slowdowns, steps, a.inner_steps, a.lease_s,
                            Path(tmp) / mode, console)
            m = out[mode]
            console.print(f"{mode}: wall {m['wall_s']} s, utilization {m['utilization']}, "
                          f"val loss {m['val_loss']}")
    lock, asy = out["lockstep"], out["async"]
    target = lock["val_loss"]
    reach = next((t for t, _, x in asy["curve"] if x is not None and x <= target), None)
    out["speedup"] = round(lock["curve"][-1][0] / reach, 3) if reach else None
    out["utilization_min_lockstep"] = lock["utilization_min"]
    out["utilization_min_async"] = asy["utilization_min"]
    console.print(f"async reaches lock-step's final val loss {target:.4f} after {reach} s "
                  f"(lock-step: {lock['curve'][-1][0]} s): {out['speedup']}x")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

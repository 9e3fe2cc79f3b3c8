"""How much of a node's time goes into training: a real network on loopback, measured.

Runs ``atom-coordinator demo``'s network (a coordinator and N node processes: Flower, TLS,
SuperNode auth, the gRPC data plane, warm workers) and reads the answer off the ledger and
the nodes' worker logs (each lease logs its unix times: received, work started and ended,
replied):

- ``utilization``: per node and overall, time inside training/evaluation steps over the wall
  time of the run (first lease issued to last reply accepted);
- ``lease_overhead_s``: median per lease of (first step - the moment the node could start:
  the lease's issue or the node's previous reply, whichever is later) + (reply accepted -
  last step), with its parts: ``wait`` (Flower delivering the lease, the SuperNode's poll),
  ``fetch`` (blobs, parse), ``upload`` (payload by digest, sign), ``reply`` (Flower back,
  the coordinator's poll and ``verify``).

    python bench/throughput.py                      # 3 nodes, tiny, 4 rounds
    python bench/throughput.py --preset small --rounds 2 --json

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from coordinator.demo import run_demo  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402

_LEASE_LINE = re.compile(r" lease (\{.*\})$")


def node_times(workdir: Path, n: int) -> dict[str, dict[str, float]]:
    """Every lease a node logged, by nonce: its unix times."""
    out: dict[str, dict[str, float]] = {}
    for i in range(n):
        log = workdir / "nodes" / str(i) / "logs" / "worker.log"
        for line in log.read_text(errors="replace").splitlines():
            if m := _LEASE_LINE.search(line):
                rec = json.loads(m.group(1))
                out[rec.pop("nonce")] = rec
    return out


def measure(ledger: Ledger, times: dict[str, dict[str, float]]) -> dict[str, Any]:
    nodes = {n.id: n.name for n in ledger.nodes()}
    updates = {u.lease_id: u for u in ledger.updates()}
    leases = [lease for lease in ledger.leases() if lease.nonce in times
              and lease.id in updates]
    start = min(lease.issued_at for lease in ledger.leases())
    end = max(u.received_at for u in updates.values())
    busy: dict[int, float] = {i: 0.0 for i in nodes}
    parts: dict[str, list[float]] = {k: [] for k in ("wait", "fetch", "upload", "reply")}
    overhead: list[float] = []
    free_at: dict[int, float] = {}  # when each node replied last
    for lease in sorted(leases, key=lambda x: times[x.nonce]["received"]):
        t = times[lease.nonce]
        busy[lease.node_id] += t["work_end"] - t["work_start"]
        ready = max(lease.issued_at, free_at.get(lease.node_id, lease.issued_at))
        got = updates[lease.id].received_at
        wait, fetch = t["received"] - ready, t["work_start"] - t["received"]
        upload, reply = t["replied"] - t["work_end"], got - t["replied"]
        for k, v in zip(parts, (wait, fetch, upload, reply)):
            parts[k].append(v)
        overhead.append(wait + fetch + upload + reply)
        free_at[lease.node_id] = t["replied"]
    wall = end - start
    per_node = {nodes[i]: round(b / wall, 3) for i, b in busy.items()}
    return {
        "utilization": round(sum(busy.values()) / (wall * len(nodes)), 3),
        "utilization_per_node": per_node,
        "lease_overhead_s": round(statistics.median(overhead), 3),
        "lease_overhead_parts_s": {k: round(statistics.median(v), 3) for k, v in parts.items()},
        "leases": len(leases),
        "wall_s": round(wall, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--inner-steps", type=int, help="override the run's default")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="atom-throughput-"))
    overrides: dict[str, Any] = {"model_preset": a.preset}
    if a.inner_steps:
        overrides["train_inner_steps"] = a.inner_steps
    t0 = time.monotonic()
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    summary, status = run_demo(nodes=a.nodes, rounds=a.rounds, workdir=workdir,
                               console=quiet, overrides=overrides)
    if status != "finished:completed":
        print(f"error: the run ended {status}: {summary.get('error')}", file=sys.stderr)
        return 1
    with Ledger(summary["ledger"], create=False) as ledger:
        out = measure(ledger, node_times(workdir, a.nodes))
    out.update(preset=a.preset, nodes=a.nodes, rounds=a.rounds,
               val_loss=summary["val_loss"], seconds=round(time.monotonic() - t0, 1))
    if not a.json:
        print(f"utilization {out['utilization']:.2f} (per node "
              + ", ".join(f"{k} {v:.2f}" for k, v in out["utilization_per_node"].items())
              + f"); lease overhead {out['lease_overhead_s']:.2f} s median "
              + str(out["lease_overhead_parts_s"]), file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A 1,000-node run ledger for the TUI's scale test and bench/tui_scale.py, built in a second.

``build_scale_ledger(path, nodes=1000, updates=5)`` writes, with bulk inserts (one
``executemany`` per table, not one transaction per row as the run loop writes them):

- ``nodes`` nodes over 40 institutions, names ``node-0001``…; every third holds an open train
  lease at ``NOW`` (working), every third else was seen 20 s ago (idle), the rest long ago
  (offline), and every 97th is revoked;
- ``updates`` answered leases per node, one in seven rejected (``norm_bound``), a credit entry
  for every accepted one; ten model versions with validation losses;
- a join event per node, a reject event per rejection, a version event per version.

Numbers differ between nodes (tokens, credits, last seen), so every column sorts to a
different order. Deterministic: no randomness, fixed timestamps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert

from coordinator.ledger import (
    CreditEntry, Event, Institution, LeaseRow, Ledger, ModelVersion, Node, UpdateRow,
)

__all__ = ["SCALE_NOW", "ScaleRun", "build_scale_ledger"]

T0 = 1_700_000_000.0
SCALE_NOW = T0 + 7200.0
RUN_ID = "scale-run"
_SHARD = 40_960
_INSTITUTIONS = 40


@dataclass(frozen=True)
class ScaleRun:
    path: Path
    url: str
    nodes: int
    now: float = SCALE_NOW
    run_id: str = RUN_ID


def _table(model: Any) -> Any:
    return model.__table__


def _rows(n_nodes: int, n_updates: int) -> dict[Any, list[dict[str, Any]]]:
    insts = [{"id": i, "name": f"Institute {i:02d} of Scale", "created_at": T0}
             for i in range(1, _INSTITUTIONS + 1)]
    nodes, leases, updates, credits, events = [], [], [], [], []
    lease_id = update_id = 0
    for n in range(1, n_nodes + 1):
        seen = (SCALE_NOW - 5 - n % 50 if n % 3 == 0 else SCALE_NOW - 20 - n % 30
                if n % 3 == 1 else T0 + 60 + n)
        nodes.append({"id": n, "flower_node_id": str(10_000 + n), "name": f"node-{n:04d}",
                      "institution_id": 1 + n % _INSTITUTIONS, "public_key_pem": f"pem-{n}",
                      "fingerprint": f"fp{n:014d}", "enrolled_at": T0 + n / 10,
                      "last_seen": seen, "revoked": n % 97 == 0})
        events.append({"at": T0 + n / 10, "kind": "join", "node_id": n,
                       "message": f"node-{n:04d} enrolled as node {n}"})
        for k in range(n_updates):
            lease_id += 1
            at = T0 + 600 * (k + 1) + n % 300
            leases.append({"id": lease_id, "run_id": RUN_ID, "round": k + 1,
                           "shard_id": lease_id, "kind": "train", "node_id": n,
                           "base_version": k, "nonce": f"{lease_id:032x}",
                           "data_start": lease_id * _SHARD, "data_end": (lease_id + 1) * _SHARD,
                           "issued_at": at - 60, "deadline": at + 240, "status": "answered",
                           "closed_at": at})
            update_id += 1
            rejected = (n + k) % 7 == 0
            tokens = _SHARD - 64 * (n % 200)
            updates.append({"id": update_id, "lease_id": lease_id, "node_id": n,
                            "arrays_digest": "ab" * 32,
                            "verdict": "rejected" if rejected else "accepted",
                            "reason": "norm_bound" if rejected else None,
                            "detail": "update norm 2500 exceeds the bound 1000" if rejected
                            else "accepted (norm 19.25)", "tokens": tokens, "steps": 40,
                            "loss_before": 5.0 - k / 2, "loss_after": 4.8 - k / 2,
                            "wall_s": 50.0, "norm": None if rejected else 19.25,
                            "received_at": at})
            if rejected:
                events.append({"at": at, "kind": "reject", "node_id": n,
                               "message": f"node-{n:04d}: norm_bound — update norm 2500 "
                                          "exceeds the bound 1000"})
            else:
                credits.append({"node_id": n, "update_id": update_id,
                                "amount": tokens / 1000,
                                "components": json.dumps({"kind": "train", "tokens": tokens,
                                                          "rate_per_1k": 1.0}),
                                "created_at": at})
        if n % 3 == 0:  # working: an open lease, issued a minute ago
            lease_id += 1
            leases.append({"id": lease_id, "run_id": RUN_ID, "round": n_updates + 1,
                           "shard_id": lease_id, "kind": "train", "node_id": n,
                           "base_version": n_updates, "nonce": f"{lease_id:032x}",
                           "data_start": lease_id * _SHARD, "data_end": (lease_id + 1) * _SHARD,
                           "issued_at": SCALE_NOW - 60, "deadline": SCALE_NOW + 240,
                           "status": "issued", "closed_at": None})
    versions = [{"version": v, "digest": f"{v:02d}" * 32, "path": f"v{v}.safetensors",
                 "round": v, "created_at": T0 + 600 * v + 400, "n_updates": n_nodes,
                 "tokens": n_nodes * _SHARD, "val_loss": 5.5 - v / 3, "val_tokens": 8192}
                for v in range(10)]
    events += [{"at": v["created_at"], "kind": "version", "node_id": None,
                "message": f"round {v['round']}: version {v['version']}"} for v in versions]
    events.sort(key=lambda e: e["at"])
    return {_table(Institution): insts, _table(Node): nodes, _table(ModelVersion): versions,
            _table(LeaseRow): leases, _table(UpdateRow): updates, _table(CreditEntry): credits,
            _table(Event): events}


def build_scale_ledger(path: Path, nodes: int = 1000, updates: int = 5) -> ScaleRun:
    """Write the scale ledger to ``path`` (a SQLite file) and close it."""
    url = f"sqlite:///{path}"
    Ledger(url).close()  # the schema, exactly as the coordinator creates it
    engine = create_engine(url)
    with engine.begin() as conn:
        for table, rows in _rows(nodes, updates).items():
            conn.execute(insert(table), rows)
    engine.dispose()
    return ScaleRun(path=path, url=url, nodes=nodes)

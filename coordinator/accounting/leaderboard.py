"""The leaderboard ``atom-coordinator export`` publishes: institutions and nodes, ranked.

Read from the ledger's per-node summaries (aggregated in SQL), on a read-only ledger.
Rank is by credits, highest first; equal credits share a rank ("1, 2, 2, 4").

Formats::

    json  {"format": "atom-leaderboard-v1", "run_id", "generated_at" (ISO 8601 UTC),
           "institutions": [{rank, institution, nodes, accepted_updates, tokens_trained,
                             tokens_evaluated, credits}],
           "nodes": [{rank, node_id, node, institution, accepted_updates, tokens_trained,
                      tokens_evaluated, credits}]}
    csv   one file, one header: scope,rank,institution,node_id,node,nodes,accepted_updates,
          tokens_trained,tokens_evaluated,credits — institution rows first (scope
          "institution", node_id and node empty), then node rows (scope "node", nodes empty).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.ledger import Ledger, NodeSummary
from coordinator.rundir import RunDir

__all__ = ["CSV_COLUMNS", "FORMATS", "Leaderboard", "Standing", "export_text", "leaderboard"]

CSV_COLUMNS = ("scope", "rank", "institution", "node_id", "node", "nodes", "accepted_updates",
               "tokens_trained", "tokens_evaluated", "credits")
FORMATS = ("csv", "json")


@dataclass(frozen=True)
class Standing:
    """One leaderboard row: an institution (``node_id`` None) or a node (``nodes`` None)."""

    scope: str  # "institution" | "node"
    rank: int
    institution: str
    node_id: int | None
    node: str | None
    nodes: int | None
    accepted_updates: int
    tokens_trained: int
    tokens_evaluated: int
    credits: float

    def to_dict(self) -> dict[str, Any]:
        keep = ("rank", "institution", "nodes") if self.scope == "institution" else (
            "rank", "node_id", "node", "institution")
        row = {k: getattr(self, k) for k in keep}
        row.update(accepted_updates=self.accepted_updates, tokens_trained=self.tokens_trained,
                   tokens_evaluated=self.tokens_evaluated, credits=self.credits)
        return row


def _ranked(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: (-r["credits"], r[name], r.get("node_id") or 0))
    rank = 0
    for i, row in enumerate(rows):
        if i == 0 or row["credits"] != rows[i - 1]["credits"]:
            rank = i + 1
        row["rank"] = rank
    return rows


@dataclass(frozen=True)
class Leaderboard:
    run_id: str
    generated_at: float
    institutions: list[Standing]
    nodes: list[Standing]

    def to_json(self) -> str:
        at = dt.datetime.fromtimestamp(self.generated_at, dt.timezone.utc)
        doc = {"format": "atom-leaderboard-v1", "run_id": self.run_id,
               "generated_at": at.isoformat(timespec="seconds").replace("+00:00", "Z"),
               "institutions": [s.to_dict() for s in self.institutions],
               "nodes": [s.to_dict() for s in self.nodes]}
        return json.dumps(doc, indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for s in (*self.institutions, *self.nodes):
            writer.writerow(["" if getattr(s, c) is None else getattr(s, c)
                             for c in CSV_COLUMNS])
        return buf.getvalue()


def leaderboard(summaries: Sequence[NodeSummary], run_id: str, now: float) -> Leaderboard:
    """Rank ``summaries`` per node and, summed, per institution."""
    nodes = _ranked([{"node_id": s.node_id, "node": s.name, "institution": s.institution,
                      "accepted_updates": s.accepted, "tokens_trained": s.tokens,
                      "tokens_evaluated": s.eval_tokens, "credits": round(s.credits, 6)}
                     for s in summaries], "node")
    by_inst: dict[str, dict[str, Any]] = {}
    for s in summaries:
        row = by_inst.setdefault(s.institution, {
            "institution": s.institution, "nodes": 0, "accepted_updates": 0,
            "tokens_trained": 0, "tokens_evaluated": 0, "credits": 0.0})
        row["nodes"] += 1
        row["accepted_updates"] += s.accepted
        row["tokens_trained"] += s.tokens
        row["tokens_evaluated"] += s.eval_tokens
        row["credits"] += s.credits
    for row in by_inst.values():
        row["credits"] = round(row["credits"], 6)
    insts = _ranked(list(by_inst.values()), "institution")
    return Leaderboard(
        run_id, now,
        [Standing("institution", node_id=None, node=None, **r) for r in insts],
        [Standing("node", nodes=None, **r) for r in nodes])


def export_text(rd: RunDir, fmt: str, *, now: float | None = None) -> str:
    """The run's leaderboard as ``fmt`` text, from its ledger opened read-only."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    cfg = rd.config()
    with Ledger.read_only(cfg.ledger_url(rd.path)) as ledger:
        board = leaderboard(ledger.node_summaries(), cfg.run.id,
                            time.time() if now is None else now)
    return board.to_csv() if fmt == "csv" else board.to_json() + "\n"

"""Read-only views of a run for people: the network, progress, one node, the events.

The one query layer between the ledger and whatever shows it (the TUI, the status RPC).
Every view is a frozen dataclass of plain values (``view_types``), so
``dataclasses.asdict(view)`` is JSON-serialisable and ``View.from_dict`` reads it back.
Nothing here writes, and nothing here imports a UI toolkit.
Time is always passed in (``now``) so a view is a pure function of the ledger and the clock.
"""

from __future__ import annotations

import math

from coordinator.ledger import LeaseRow, NodeSummary
from coordinator.ledger.reads import LedgerReads
from protocol.errors import LedgerError
from protocol.messages import Kind, Verdict
from protocol.view_types import (
    CreditRow, EventRow, EventsView, HistoryPoint, LossPoint, NetworkHeader, NetworkView,
    NodeDetail, NodeRow, ProgressView, RunInfo, ThroughputPoint, UpdateLine,
)

__all__ = [
    "EventRow", "EventsView", "HistoryPoint", "LossPoint", "NetworkHeader", "NetworkView",
    "NodeDetail", "NodeRow", "ONLINE_STATUSES", "ONLINE_WINDOW_S", "ProgressView", "RunInfo",
    "THROUGHPUT_WINDOW_S", "ThroughputPoint", "UpdateLine", "CreditRow", "events_view",
    "network_view", "network_view_until", "node_detail", "node_detail_until", "node_status",
    "progress_view", "run_info", "status_until",
]

# The run loop touches every online node at each phase; a node unseen for longer is offline.
ONLINE_WINDOW_S = 60.0
# The header's network tokens/s is averaged over this many recent seconds.
THROUGHPUT_WINDOW_S = 120.0
# working: holds an open lease; idle: online, waiting for work.
ONLINE_STATUSES = ("working", "idle")


def node_status(last_seen: float | None, open_lease: LeaseRow | None, now: float,
                revoked: bool = False) -> str:
    """The one definition of a node's status (see ONLINE_WINDOW_S)."""
    if revoked:
        return "revoked"
    recent = last_seen is not None and now - last_seen <= ONLINE_WINDOW_S
    # A node training past the online window is still working until its deadline.
    if open_lease is not None and (recent or open_lease.deadline >= now):
        return "working"
    return "idle" if recent else "offline"


def status_until(last_seen: float | None, open_lease: LeaseRow | None, now: float,
                 revoked: bool = False) -> float:
    """The moment before which ``node_status`` keeps its value at ``now`` if nothing is
    written: the node leaving the online window or its open lease's deadline passing,
    whichever is first (``inf``: only a write changes it)."""
    if revoked:
        return math.inf
    turns = []
    if last_seen is not None and now - last_seen <= ONLINE_WINDOW_S:
        turns.append(math.nextafter(last_seen + ONLINE_WINDOW_S, math.inf))
    if open_lease is not None and open_lease.deadline >= now:
        turns.append(math.nextafter(open_lease.deadline, math.inf))
    return min(turns, default=math.inf)


def run_info(ledger: LedgerReads, run_id: str | None = None) -> RunInfo:
    """Run id (from the config when known, else the latest lease), round and version."""
    lease = ledger.latest_lease()
    latest = ledger.latest_version()
    return RunInfo(run_id=run_id or (lease.run_id if lease else ""),
                   round=lease.round if lease else 0,
                   version=latest.version if latest else None,
                   val_loss=latest.val_loss if latest else None)


def _row(s: NodeSummary, lease: LeaseRow | None, now: float) -> NodeRow:
    status = node_status(s.last_seen, lease, now, s.revoked)
    answered = s.accepted + s.rejected
    return NodeRow(
        node_id=s.node_id, name=s.name, institution=s.institution, status=status,
        current_shard=f"{lease.kind} {lease.shard_id}" if lease and status == "working" else "",
        accepted=s.accepted, rejected=s.rejected, tokens=s.tokens, eval_tokens=s.eval_tokens,
        credits=s.credits, acceptance_rate=s.accepted / answered if answered else None,
        last_seen=s.last_seen)


def _open_leases(ledger: LedgerReads) -> dict[int, LeaseRow]:
    newest: dict[int, LeaseRow] = {}
    for lease in ledger.open_leases():  # ordered by id: the newest wins
        newest[lease.node_id] = lease
    return newest


def network_view(ledger: LedgerReads, now: float, run_id: str | None = None) -> NetworkView:
    """Every node's row and the network header, in five queries whatever the node count."""
    return network_view_until(ledger, now, run_id)[0]


def network_view_until(ledger: LedgerReads, now: float,
                       run_id: str | None = None) -> tuple[NetworkView, float]:
    """:func:`network_view` and the moment before which it stays the same (``at`` aside) if
    the ledger does not change: the first node status to turn with the clock, or the first
    update to leave (or enter) the header's throughput window."""
    leases = _open_leases(ledger)
    summaries = ledger.node_summaries()
    rows = tuple(_row(s, leases.get(s.node_id), now) for s in summaries)
    recent = ledger.accepted_work("train", since=now - THROUGHPUT_WINDOW_S)
    tokens = sum(t for at, t, _ in recent if at <= now)
    header = NetworkHeader(run=run_info(ledger, run_id),
                           online=sum(r.status in ONLINE_STATUSES for r in rows),
                           nodes=len(rows), tokens_per_s=tokens / THROUGHPUT_WINDOW_S,
                           window_s=THROUGHPUT_WINDOW_S)
    until = min((status_until(s.last_seen, leases.get(s.node_id), now, s.revoked)
                 for s in summaries), default=math.inf)
    for at, _, _ in recent:  # counted while now < at + window; a future one from at on
        until = min(until, at + THROUGHPUT_WINDOW_S if at <= now else at)
    return NetworkView(at=now, header=header, nodes=rows), until


def _bucket_size(span: float, max_buckets: int, min_bucket_s: float) -> float:
    raw = max(span / max_buckets, min_bucket_s)
    for nice in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400):
        if nice >= raw:
            return float(nice)
    return float(math.ceil(raw / 86400) * 86400)


def _throughput(work: list[tuple[float, int, float | None]], max_buckets: int,
                min_bucket_s: float) -> tuple[tuple[ThroughputPoint, ...], float]:
    """Tokens per bucket; an update's tokens are spread over the ``wall_s`` it trained for
    (ending when it was received), so a plot shows training time, not arrival spikes."""
    if not work:
        return (), min_bucket_s
    spans = [(at - max(wall or 0.0, 0.0), at, tokens) for at, tokens, wall in work]
    first, last = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    size = _bucket_size(last - first, max_buckets, min_bucket_s)
    origin = math.floor(first / size) * size
    totals = [0.0] * (int((last - origin) // size) + 1)
    for start, end, tokens in spans:
        if end <= start:
            totals[int((end - origin) // size)] += tokens
            continue
        for i in range(int((start - origin) // size), int((end - origin) // size) + 1):
            lo, hi = max(start, origin + i * size), min(end, origin + (i + 1) * size)
            totals[i] += tokens * max(hi - lo, 0.0) / (end - start)
    points = tuple(ThroughputPoint(start=origin + i * size, tokens=round(t),
                                   tokens_per_s=t / size) for i, t in enumerate(totals))
    return points, size


def progress_view(ledger: LedgerReads, max_buckets: int = 60,
                  min_bucket_s: float = 10.0) -> ProgressView:
    """Validation loss per model version and the network's train throughput over time."""
    losses = tuple(LossPoint(version=v.version, round=v.round, val_loss=v.val_loss,
                             tokens=v.tokens, created_at=v.created_at)
                   for v in ledger.versions())
    points, size = _throughput(ledger.accepted_work("train"), max_buckets, min_bucket_s)
    return ProgressView(losses=losses, throughput=points, bucket_s=size)


def node_detail(ledger: LedgerReads, node_id: int, now: float) -> NodeDetail:
    """One node's row, contribution history, updates and credit entries.

    Raises
    ------
    LedgerError
        There is no such node.
    """
    return node_detail_until(ledger, node_id, now)[0]


def node_detail_until(ledger: LedgerReads, node_id: int, now: float) -> tuple[NodeDetail, float]:
    """:func:`node_detail` and the moment before which it stays the same if the ledger does
    not change (its status turning with the clock; see :func:`status_until`)."""
    found = ledger.node_summaries(node_id)  # only this node's: a contributor sees no other
    if not found:
        raise LedgerError(f"no node {node_id} in the ledger")
    summary = found[0]
    open_lease = _open_leases(ledger).get(node_id)
    pairs = ledger.updates_with_leases(node_id)
    entries = ledger.credits(node_id)
    credit_of = {c.update_id: c.amount for c in entries}
    history, tokens, credits = [], 0, 0.0
    for u, lease in sorted(pairs, key=lambda p: (p[0].received_at, p[0].id)):
        if u.verdict != Verdict.ACCEPTED and (u.id or 0) not in credit_of:  # a penalty counts
            continue
        tokens += u.tokens if lease.kind == Kind.TRAIN and u.verdict == Verdict.ACCEPTED else 0
        credits += credit_of.get(u.id or 0, 0.0)
        history.append(HistoryPoint(at=u.received_at, tokens=tokens, credits=credits))
    updates = tuple(UpdateLine(
        update_id=u.id or 0, at=u.received_at, round=lease.round, kind=lease.kind,
        shard_id=lease.shard_id, verdict=u.verdict, reason=u.reason, detail=u.detail,
        tokens=u.tokens, loss_before=u.loss_before, loss_after=u.loss_after,
        norm=u.norm)
        for u, lease in pairs)
    rows = tuple(CreditRow(credit_id=c.id or 0, at=c.created_at, update_id=c.update_id,
                           amount=c.amount, components=c.components_dict()) for c in entries)
    by_kind: dict[str, float] = {}
    for c in rows:
        kind = str(c.components.get("kind", "other"))
        by_kind[kind] = by_kind.get(kind, 0.0) + c.amount
    detail = NodeDetail(row=_row(summary, open_lease, now), history=tuple(history),
                        updates=updates, credits=rows, credits_by_kind=by_kind)
    return detail, status_until(summary.last_seen, open_lease, now, summary.revoked)


def events_view(ledger: LedgerReads, since_id: int = 0, limit: int = 500) -> EventsView:
    """Events newer than ``since_id``, oldest first."""
    rows = tuple(EventRow(event_id=e.id or 0, at=e.at, kind=e.kind, node_id=e.node_id,
                          message=e.message) for e in ledger.events(since_id, limit))
    return EventsView(events=rows, last_id=rows[-1].event_id if rows else since_id)

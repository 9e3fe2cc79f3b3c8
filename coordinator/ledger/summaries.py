"""Per-node contribution summaries, aggregated by the database (GROUP BY), not in Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, case, func, or_, select
from sqlmodel import col

from protocol.errors import Reason
from protocol.kinds import Kind, Verdict

from coordinator.ledger.models import CreditEntry, Institution, LeaseRow, Node, UpdateRow
from coordinator.verify.trust import NEW_NODE_TRUST, trust_score

__all__ = ["NodeSummary", "node_summaries_query"]


@dataclass(frozen=True)
class NodeSummary:
    """What one node has contributed so far.

    ``tokens`` counts accepted train tokens, ``eval_tokens`` accepted evaluation tokens
    (validation windows and lm-eval tasks);
    ``credits`` is the sum of the node's credit entries. ``trust`` is
    ``coordinator.verify.trust.trust_score`` of its train updates (derived from its record, so not
    part of equality).
    """

    node_id: int
    name: str
    institution: str
    accepted: int
    rejected: int
    tokens: int
    eval_tokens: int
    credits: float
    last_seen: float | None
    revoked: bool
    trust: float = field(default=NEW_NODE_TRUST, compare=False)

    @classmethod
    def from_row(cls, row: Any) -> NodeSummary:
        # PostgreSQL sums BIGINTs as NUMERIC (Decimal): normalise the types here.
        return cls(
            node_id=int(row.node_id), name=row.name, institution=row.institution,
            accepted=int(row.accepted), rejected=int(row.rejected), tokens=int(row.tokens),
            eval_tokens=int(row.eval_tokens), credits=float(row.credits),
            last_seen=None if row.last_seen is None else float(row.last_seen),
            revoked=bool(row.revoked),
            trust=trust_score(int(row.train_accepted), int(row.train_rejected),
                              int(row.mismatches)),
        )


def node_summaries_query(node_id: int | None = None) -> Select[Any]:
    """One row per node (only ``node_id`` when given: its subqueries are filtered too).
    Updates and credits are grouped in separate subqueries so that joining both onto a
    node cannot multiply either sum."""
    accepted = col(UpdateRow.verdict) == Verdict.ACCEPTED.value
    train = col(LeaseRow.kind) == Kind.TRAIN.value
    lost = col(UpdateRow.reason).in_(sorted(Reason.MISMATCHES))

    def accepted_tokens(*kinds: str) -> Any:
        wanted = and_(accepted, col(LeaseRow.kind).in_(kinds))
        return func.sum(case((wanted, col(UpdateRow.tokens)), else_=0))

    def count(condition: Any) -> Any:
        return func.sum(case((condition, 1), else_=0))

    by_update = (
        select(
            col(UpdateRow.node_id).label("node_id"),
            func.sum(case((accepted, 1), else_=0)).label("accepted"),
            func.sum(case((accepted, 0), else_=1)).label("rejected"),
            accepted_tokens(Kind.TRAIN.value).label("tokens"),
            accepted_tokens(Kind.EVAL.value, Kind.TASKS.value).label("eval_tokens"),
            count(and_(train, accepted)).label("train_accepted"),
            # a lost eval check counts like a lost spot check (coordinator.verify.trust)
            count(or_(and_(train, col(UpdateRow.verdict) != Verdict.ACCEPTED.value), lost))
            .label("train_rejected"),
            count(lost).label("mismatches"),
        )
        .join(LeaseRow, col(LeaseRow.id) == col(UpdateRow.lease_id))
        .group_by(col(UpdateRow.node_id))
    )
    by_credit = (
        select(col(CreditEntry.node_id).label("node_id"),
               func.sum(col(CreditEntry.amount)).label("credits"))
        .group_by(col(CreditEntry.node_id))
    )
    if node_id is not None:
        by_update = by_update.where(col(UpdateRow.node_id) == node_id)
        by_credit = by_credit.where(col(CreditEntry.node_id) == node_id)
    per_update, per_credit = by_update.subquery(), by_credit.subquery()
    query = (
        select(
            col(Node.id).label("node_id"),
            col(Node.name).label("name"),
            col(Institution.name).label("institution"),
            func.coalesce(per_update.c.accepted, 0).label("accepted"),
            func.coalesce(per_update.c.rejected, 0).label("rejected"),
            func.coalesce(per_update.c.tokens, 0).label("tokens"),
            func.coalesce(per_update.c.eval_tokens, 0).label("eval_tokens"),
            func.coalesce(per_credit.c.credits, 0.0).label("credits"),
            func.coalesce(per_update.c.train_accepted, 0).label("train_accepted"),
            func.coalesce(per_update.c.train_rejected, 0).label("train_rejected"),
            func.coalesce(per_update.c.mismatches, 0).label("mismatches"),
            col(Node.last_seen).label("last_seen"),
            col(Node.revoked).label("revoked"),
        )
        .join(Institution, col(Institution.id) == col(Node.institution_id))
        .outerjoin(per_update, per_update.c.node_id == col(Node.id))
        .outerjoin(per_credit, per_credit.c.node_id == col(Node.id))
        .order_by(col(Node.id))
    )
    return query if node_id is None else query.where(col(Node.id) == node_id)

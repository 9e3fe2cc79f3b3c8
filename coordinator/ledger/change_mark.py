"""The ledger's change mark: a few numbers, read in one statement, that move whenever
anything a read-only view shows is written.

Readers that show the run live (``atom-tui`` on a ledger, the coordinator's status stream)
read the mark every second and the views only when it moved: at 1,000 nodes the mark is a
fraction of a millisecond, the views some 40 ms. Every write of ``Ledger`` moves one of them:

==========================  =================================================================
a write                     moves
==========================  =================================================================
add_event                   ``events`` (the newest event id)
record_lease, close_lease   ``leases`` (the newest lease id, the number still issued)
record_update               ``updates`` (the newest update id) and ``leases``
add_credit, add_penalty     ``credits`` (the newest credit entry id)
add_model_version,          ``versions`` (how many, how many have a validation loss, their
set_val_loss                sum)
add_node, touch_node(s),    ``nodes`` (how many, the sum of their last-seen times, how many
revoke_node                 are revoked)
==========================  =================================================================

Ids and counts only grow and a touch moves a node's last-seen time, so a mark equal to the
last one means nothing shown has changed (``tests/ledger/test_change_mark.py`` checks each
write). A view that also moves with the clock (a node going offline) says until when it holds
(``coordinator.services.views.network_view_until``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlmodel import col

from coordinator.ledger.models import CreditEntry, Event, LeaseRow, ModelVersion, Node, UpdateRow

__all__ = ["ChangeMark", "change_mark_query"]


@dataclass(frozen=True)
class ChangeMark:
    events: int
    leases: tuple[int, int]
    updates: int
    credits: int
    versions: tuple[int, int, float]
    nodes: tuple[int, float, int]

    @classmethod
    def from_row(cls, row: Any) -> ChangeMark:
        # Empty tables give NULL; PostgreSQL sums come back as Decimal: plain numbers here.
        n = [0 if v is None else v for v in row]
        return cls(events=int(n[0]), leases=(int(n[1]), int(n[2])), updates=int(n[3]),
                   credits=int(n[4]), versions=(int(n[5]), int(n[6]), float(n[7])),
                   nodes=(int(n[8]), float(n[9]), int(n[10])))


def _one(expr: Any, *where: Any) -> Any:
    return select(expr).where(*where).scalar_subquery()


def change_mark_query() -> Select[Any]:
    """One row of scalar subqueries, each answered from an index or a small table."""
    return select(
        _one(func.max(col(Event.id))),
        _one(func.max(col(LeaseRow.id))),
        _one(func.count(col(LeaseRow.id)), col(LeaseRow.status) == "issued"),
        _one(func.max(col(UpdateRow.id))),
        _one(func.max(col(CreditEntry.id))),
        _one(func.count(col(ModelVersion.version))),
        _one(func.count(col(ModelVersion.val_loss))),
        _one(func.sum(col(ModelVersion.val_loss))),
        _one(func.count(col(Node.id))),
        _one(func.sum(col(Node.last_seen))),
        _one(func.count(col(Node.id)), col(Node.revoked).is_(True)),
    )

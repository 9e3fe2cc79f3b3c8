"""The ATOM ledger: SQLModel tables behind one ``Ledger`` interface (SQLite or PostgreSQL)."""

from __future__ import annotations

from coordinator.ledger.ledger import Ledger
from coordinator.ledger.models import (
    CreditEntry, CreditReceipt, Event, Institution, Invite, LeaseRow, ModelVersion, Node,
    TaskScoreRow, UpdateRow, VersionEval,
)
from coordinator.ledger.summaries import NodeSummary

__all__ = [
    "CreditEntry",
    "CreditReceipt",
    "Event",
    "Institution",
    "Invite",
    "LeaseRow",
    "Ledger",
    "ModelVersion",
    "Node",
    "NodeSummary",
    "TaskScoreRow",
    "UpdateRow",
    "VersionEval",
]

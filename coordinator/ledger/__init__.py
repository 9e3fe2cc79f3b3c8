"""The ATOM ledger: SQLModel tables behind one ``Ledger`` interface (SQLite or PostgreSQL)."""

from __future__ import annotations

from coordinator.ledger.ledger import Ledger
from coordinator.ledger.models import (
    CreditEntry, CreditReceipt, Event, Institution, Invite, Lease, ModelVersion, Node, Update,
    VersionEval,
)
from coordinator.ledger.summaries import NodeSummary

__all__ = [
    "CreditEntry",
    "CreditReceipt",
    "Event",
    "Institution",
    "Invite",
    "Lease",
    "Ledger",
    "ModelVersion",
    "Node",
    "NodeSummary",
    "Update",
    "VersionEval",
]

"""``atom-tui``: a Textual view of a run, over a read-only ledger or a coordinator's status
service (see coordinator.views)."""

from __future__ import annotations

from .app import AtomApp, make_app
from .coordinator_source import CoordinatorSource
from .source import LedgerSource, Snapshot, Source

__all__ = ["AtomApp", "CoordinatorSource", "LedgerSource", "Snapshot", "Source", "make_app"]

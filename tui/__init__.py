"""``atom-tui``: a Textual view of a run, over a read-only ledger (see coordinator.views)."""

from __future__ import annotations

from .app import AtomApp, make_app
from .source import LedgerSource, Snapshot, Source

__all__ = ["AtomApp", "LedgerSource", "Snapshot", "Source", "make_app"]

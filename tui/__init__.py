"""``atom-tui``: a Textual view of a run, over a read-only ledger or a coordinator's status
service (see coordinator.services.views)."""

from __future__ import annotations

from typing import Any

from .app import AtomApp, make_app
from .coordinator_source import CoordinatorSource
from .snapshot import Snapshot, Source

__all__ = ["AtomApp", "CoordinatorSource", "LedgerSource", "Snapshot", "Source", "make_app"]


def __getattr__(name: str) -> Any:
    # the ledger (SQLModel, SQLAlchemy) loads only for `atom-tui --db`: a TUI on a
    # coordinator's status service never imports it
    if name == "LedgerSource":
        from .source import LedgerSource
        return LedgerSource
    raise AttributeError(name)

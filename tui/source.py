"""Where the TUI's numbers come from: a read-only ledger, queried through coordinator.services.views."""

from __future__ import annotations

from coordinator.ledger import Ledger
from coordinator.ledger.reads import LedgerReads
from coordinator.services.views import (
    events_view, network_view, node_detail, progress_view, run_info,
)

from .snapshot import Snapshot, Source

__all__ = ["LedgerSource", "Snapshot", "Source"]  # Snapshot, Source: from .snapshot


class LedgerSource:
    """A run's ledger, opened read-only (the database refuses writes too).

    ``LedgerSource(url)`` opens it (LedgerError, one line, when it does not open);
    an already open read-only ledger is taken as it is.
    """

    def __init__(self, ledger: str | LedgerReads, run_id: str | None = None) -> None:
        if isinstance(ledger, str):
            ledger = Ledger.read_only(ledger)
        if not ledger.is_read_only:
            raise ValueError("the TUI reads the ledger only: open it with Ledger.read_only")
        self.ledger = ledger
        self.run_id = run_id
        self.name = ledger.url

    @classmethod
    def open(cls, url: str, run_id: str | None = None) -> LedgerSource:
        return cls(url, run_id)

    def check_node(self, node_id: int) -> None:
        """Raises LedgerError when the ledger has no such node."""
        node_detail(self.ledger, node_id, 0.0)

    def fetch(self, now: float, *, network: bool = True, since_event: int = 0,
              detail_node: int | None = None) -> Snapshot:
        """One consistent-enough read of what the screens show (several short queries)."""
        detail = None if detail_node is None else node_detail(self.ledger, detail_node, now)
        if not network:
            return Snapshot(at=now, run=run_info(self.ledger, self.run_id), detail=detail)
        view = network_view(self.ledger, now, self.run_id)
        return Snapshot(at=now, run=view.header.run, network=view,
                        progress=progress_view(self.ledger),
                        events=events_view(self.ledger, since_event), detail=detail)

    def close(self) -> None:
        self.ledger.close()

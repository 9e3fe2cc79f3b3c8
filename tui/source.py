"""Where the TUI's numbers come from: a read-only ledger, read through
``coordinator.services.views``.

Each poll first reads the ledger's change mark (``coordinator.services.view_cache``): when
nothing shown has changed the views come back as the same objects without a query, and the
screens, seeing the same objects, redraw nothing (at 1,000 nodes a poll then costs under a
millisecond instead of some 40 ms).
"""

from __future__ import annotations

from coordinator.ledger import Ledger
from coordinator.ledger.reads import LedgerReads
from coordinator.services.view_cache import ViewCache
from coordinator.services.views import node_detail

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
        self.views = ViewCache(ledger, run_id)

    @classmethod
    def open(cls, url: str, run_id: str | None = None) -> LedgerSource:
        return cls(url, run_id)

    def check_node(self, node_id: int) -> None:
        """Raises LedgerError when the ledger has no such node."""
        node_detail(self.ledger, node_id, 0.0)

    def fetch(self, now: float, *, network: bool = True, since_event: int = 0,
              detail_node: int | None = None) -> Snapshot:
        """One consistent-enough read of what the screens show: the change mark, then only
        the views it says have changed (several short queries each)."""
        views = self.views
        views.refresh()
        detail = None if detail_node is None else views.node(detail_node, now)
        if not network:
            return Snapshot(at=now, run=views.run(now), detail=detail)
        net = views.network(now)
        return Snapshot(at=now, run=net.header.run, network=net, progress=views.progress(now),
                        events=views.events(since_event), detail=detail)

    def close(self) -> None:
        self.ledger.close()

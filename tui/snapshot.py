"""What one poll of a source returns, and what a source is: no ledger, no gRPC here (the
coordinator's status client and the ledger source both build on it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from protocol.view_types import EventsView, NetworkView, NodeDetail, ProgressView, RunInfo

__all__ = ["Snapshot", "Source"]


@dataclass(frozen=True)
class Snapshot:
    """Everything one poll read. In the contributor view only ``run`` and ``detail`` are
    filled: other nodes, the network, progress and events are never queried."""

    at: float
    run: RunInfo
    network: NetworkView | None = None
    progress: ProgressView | None = None
    events: EventsView | None = None
    detail: NodeDetail | None = None


class Source(Protocol):
    """What the app reads from: a ledger (``LedgerSource``) or a running coordinator's status
    service (``tui.coordinator_source.CoordinatorSource``)."""

    name: str

    def fetch(self, now: float, *, network: bool = True, since_event: int = 0,
              detail_node: int | None = None) -> Snapshot: ...

    def check_node(self, node_id: int) -> None: ...

    def close(self) -> None: ...

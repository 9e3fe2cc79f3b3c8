"""What one poll of a source returns, and what a source is: no ledger, no gRPC here (the
coordinator's status client and the ledger source both build on it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from protocol.view_types import EventsView, NetworkView, NodeDetail, ProgressView, RunInfo

__all__ = ["Snapshot", "Source", "Stream", "StreamingSource"]


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


class Stream(Protocol):
    """Snapshots pushed by a source as its views change (``StreamingSource.stream``)."""

    def follow_node(self, node_id: int | None) -> None:
        """Push this node's detail too from now on (None: no node's)."""

    def close(self) -> None: ...


@runtime_checkable
class StreamingSource(Source, Protocol):
    """A source that can push instead of being polled: a coordinator's status stream
    (``tui.status_stream``). Each callback is called from a reader thread."""

    def stream(self, *, network: bool, since_event: int,
               on_snapshot: Callable[[Snapshot], None], on_error: Callable[[str], None],
               on_fallback: Callable[[], None]) -> Stream: ...

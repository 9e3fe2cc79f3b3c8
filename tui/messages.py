"""Every message the TUI's widgets, screens and workers send each other."""

from __future__ import annotations

from textual.message import Message

from .snapshot import Snapshot

__all__ = ["NodeChosen", "PollInstead", "SnapshotReady", "SourceFailed"]


class SnapshotReady(Message):
    """The poll worker read the source, or its stream pushed a change."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class SourceFailed(Message):
    """The poll worker could not read the source (it keeps trying)."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class PollInstead(Message):
    """The source cannot stream (an older coordinator, no stream slot free): poll it."""


class NodeChosen(Message):
    """The user picked a node (Enter on the network table): open its detail."""

    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

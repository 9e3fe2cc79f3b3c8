"""Events: joins, leaves, rejected updates with their reason, reissued shards, versions."""

from __future__ import annotations

from textual.app import ComposeResult

from ..snapshot import Snapshot
from ..widgets import EventTable, RowNote
from .base import AtomScreen

__all__ = ["EventsScreen"]


class EventsScreen(AtomScreen):
    LABEL = "Events"

    def body(self) -> ComposeResult:
        yield EventTable(id="events")
        yield RowNote("events", id="event-note")

    def show(self, snapshot: Snapshot) -> None:
        # The app keeps every event seen so far: this screen may open long after they came.
        self.query_one(EventTable).show(self.atom.events)
        self.show_notes()

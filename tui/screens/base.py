"""What every screen shares: the run header on top, the key footer below, live data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from ..snapshot import Snapshot
from ..widgets import NotedTable, RowNote, RunHeader

if TYPE_CHECKING:
    from ..app import AtomApp

__all__ = ["AtomScreen"]


class AtomScreen(Screen[None]):
    """Subclasses compose their body in ``body()`` and draw a snapshot in ``show()``."""

    LABEL = ""

    @property
    def atom(self) -> AtomApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield RunHeader(id="run-header")
        yield from self.body()
        yield Footer()

    def body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.watch(self.app, "snapshot", self._on_snapshot)

    def _on_snapshot(self, snapshot: Snapshot | None) -> None:
        header = self.query_one(RunHeader)
        if snapshot is None:
            header.show(self.LABEL, None)
            return
        self.show(snapshot)  # first: it may name the screen (a node's name)
        network = snapshot.network.header if snapshot.network else None
        header.show(self.LABEL, snapshot.run, network)

    def show(self, snapshot: Snapshot) -> None:
        raise NotImplementedError

    def show_notes(self) -> None:
        """Refresh every row note from its table (after rows were added)."""
        for note in self.query(RowNote):
            note.show(self.query_one(f"#{note.table_id}", NotedTable))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if isinstance(event.data_table, NotedTable):
            for note in self.query(RowNote):
                if note.table_id == event.data_table.id:
                    note.show(event.data_table)

"""The run's events, oldest at the top; follows the newest while the cursor is at the end."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from protocol.view_types import EventRow

from .. import format as fmt
from .row_note import NotedTable

__all__ = ["EventTable", "KIND_STYLE"]

KIND_STYLE = {"join": "green", "online": "green", "leave": "yellow", "reject": "bold red",
              "reissue": "magenta", "version": "cyan", "round": "blue", "run": "bold",
              "error": "bold red"}


class EventTable(NotedTable):
    DEFAULT_CSS = "EventTable { height: 1fr; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.last_id = 0

    def on_mount(self) -> None:
        for label in ("time", "kind", "message"):
            self.add_column(label, key=label)

    def show(self, events: Sequence[EventRow]) -> None:
        new = [e for e in events if e.event_id > self.last_id]
        if not new:
            return
        follow = self.row_count == 0 or self.cursor_row >= self.row_count - 1
        for e in new:
            kind = Text(e.kind, style=KIND_STYLE.get(e.kind, ""))
            self.add_row(Text(fmt.clock(e.at)), kind, Text(e.message), key=str(e.event_id))
            self.notes[str(e.event_id)] = Text.assemble(kind, f" · {e.message}")
        self.last_id = new[-1].event_id
        if follow:
            self.move_cursor(row=self.row_count - 1, animate=False)

"""A line under a table with the whole text of the highlighted row, which the table itself
may cut at the terminal's edge (a rejection's detail, a long event message)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable, Static

__all__ = ["NotedTable", "RowNote"]


class NotedTable(DataTable[Text]):
    """A table that keeps a note (the full text) per row."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.notes: dict[str, Text] = {}

    def cursor_note(self) -> Text:
        if not self.row_count:
            return Text()
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return self.notes.get(key or "", Text())


class RowNote(Static):
    DEFAULT_CSS = """
    RowNote { height: auto; max-height: 2; padding: 0 1; background: $boost; color: $text-muted; }
    """

    def __init__(self, table_id: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.table_id = table_id

    def show(self, table: NotedTable) -> None:
        self.update(table.cursor_note())

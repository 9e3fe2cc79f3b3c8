"""The network's node table: one row per node, sortable by any column, updated in place."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from protocol.view_types import NodeRow

from .. import format as fmt
from ..messages import NodeChosen

__all__ = ["COLUMNS", "NodeTable", "STATUS_STYLE", "fit"]

STATUS_STYLE = {"working": "bold green", "idle": "cyan", "offline": "dim", "revoked": "red"}
_STATUS_ORDER = {s: i for i, s in enumerate(STATUS_STYLE)}


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    numeric: bool  # right-aligned, sorts largest first
    sort: Callable[[NodeRow], Any]
    cell: Callable[[NodeRow, float], str]
    wide: bool = False  # shown only when the terminal has room


COLUMNS: tuple[Column, ...] = (
    Column("name", "node", False, lambda r: r.name.lower(), lambda r, _: r.name),
    Column("institution", "institution", False, lambda r: r.institution.lower(),
           lambda r, _: r.institution),
    Column("status", "status", False, lambda r: _STATUS_ORDER.get(r.status, 9),
           lambda r, _: r.status),
    Column("shard", "shard", False, lambda r: r.current_shard, lambda r, _: r.current_shard),
    Column("accepted", "acc", True, lambda r: r.accepted, lambda r, _: str(r.accepted)),
    Column("rejected", "rej", True, lambda r: r.rejected, lambda r, _: str(r.rejected)),
    Column("tokens", "tokens", True, lambda r: r.tokens, lambda r, _: fmt.tokens(r.tokens)),
    Column("eval", "eval tok", True, lambda r: r.eval_tokens,
           lambda r, _: fmt.tokens(r.eval_tokens), wide=True),
    Column("credits", "credits", True, lambda r: r.credits, lambda r, _: fmt.credits(r.credits)),
    Column("rate", "rate", True, lambda r: -1.0 if r.acceptance_rate is None
           else r.acceptance_rate, lambda r, _: fmt.rate(r.acceptance_rate)),
    Column("seen", "seen", True, lambda r: -math.inf if r.last_seen is None else r.last_seen,
           lambda r, now: fmt.ago(r.last_seen, now)),
)
_BY_KEY = {c.key: c for c in COLUMNS}
_NAME_MAX = 16
WIDE = 100  # columns from which the wide-only columns show


class NodeTable(DataTable[Text]):
    """Rows keyed by node id; the cursor stays on its node when the order changes."""

    DEFAULT_CSS = "NodeTable { height: 1fr; }"
    BINDINGS = [Binding("enter", "select_cursor", "Detail")]  # shown in the footer

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.sort_key: str | None = None
        self.reverse = False
        self._rows: tuple[NodeRow, ...] = ()
        self._now = 0.0
        self._shown: list[tuple[str, list[str]]] = []
        self._width = -1

    # -- sorting ------------------------------------------------------------------------

    def sort_by(self, key: str) -> None:
        """Sort by column ``key``; again on the same column flips the order."""
        if key == self.sort_key:
            self.reverse = not self.reverse
        else:
            self.sort_key, self.reverse = key, _BY_KEY[key].numeric
        self._redraw(rebuild=True)

    @property
    def columns_shown(self) -> tuple[Column, ...]:
        wide = (self.size.width or 80) >= WIDE
        return tuple(c for c in COLUMNS if wide or not c.wide)

    def cycle_sort(self) -> None:
        keys = [c.key for c in self.columns_shown]
        nxt = keys[(keys.index(self.sort_key) + 1) % len(keys)] if self.sort_key else keys[0]
        self.sort_by(nxt)

    def reverse_sort(self) -> None:
        if self.sort_key is None:
            self.sort_key = self.columns_shown[0].key
        self.reverse = not self.reverse
        self._redraw(rebuild=True)

    def ordered(self) -> list[NodeRow]:
        rows = sorted(self._rows, key=lambda r: r.node_id)
        if self.sort_key is not None:  # stable: ties stay in node-id order
            rows.sort(key=_BY_KEY[self.sort_key].sort, reverse=self.reverse)
        return rows

    # -- contents -----------------------------------------------------------------------

    @property
    def selected_node_id(self) -> int | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        return None if key.value is None else int(key.value)

    def show(self, rows: Sequence[NodeRow], now: float) -> None:
        self._rows, self._now = tuple(rows), now
        self._redraw(rebuild=False)

    def on_resize(self) -> None:
        if self.size.width != self._width:
            self._redraw(rebuild=True)

    def _label(self, col: Column) -> Text:
        arrow = ("▼" if self.reverse else "▲") if col.key == self.sort_key else ""
        return Text(col.label + arrow, justify="right" if col.numeric else "left")

    def _cells(self, ordered: list[NodeRow]) -> list[tuple[str, list[str]]]:
        cols = self.columns_shown
        raw = [[c.cell(r, self._now) for c in cols] for r in ordered]
        widths = [max([len(self._label(c).plain)] + [len(row[i]) for row in raw])
                  for i, c in enumerate(cols)]
        # The institution column gives way so the table fits the terminal's width.
        inst = 1
        others = sum(w for i, w in enumerate(widths) if i != inst)
        # (the content region leaves out a vertical scrollbar when there is one)
        room = (self.scrollable_content_region.width or 80) - others - 2 * len(cols)
        widths[inst] = max(min(widths[inst], room), 6)
        for row in raw:
            row[0] = fit(row[0], _NAME_MAX)
            row[inst] = fit(row[inst], widths[inst])
        return [(str(r.node_id), row) for r, row in zip(ordered, raw)]

    def _styled(self, col: Column, value: str) -> Text:
        style = STATUS_STYLE.get(value, "") if col.key == "status" else ""
        return Text(value, style=style, justify="right" if col.numeric else "left")

    def _redraw(self, *, rebuild: bool) -> None:
        shown, cols = self._cells(self.ordered()), self.columns_shown
        if not rebuild and [k for k, _ in shown] == [k for k, _ in self._shown]:
            for (key, cells), (_, old) in zip(shown, self._shown):
                for col, new, was in zip(cols, cells, old):
                    if new != was:
                        self.update_cell(key, col.key, self._styled(col, new), update_width=True)
            self._shown = shown
            return
        selected = self.selected_node_id
        self.clear(columns=True)
        for col in cols:
            self.add_column(self._label(col), key=col.key)
        for key, cells in shown:
            self.add_row(*(self._styled(c, v) for c, v in zip(cols, cells)), key=key)
        self._shown, self._width = shown, self.size.width
        keys = [k for k, _ in shown]
        if selected is not None and str(selected) in keys:
            self.move_cursor(row=keys.index(str(selected)), animate=False)

    # -- events -------------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(NodeChosen(int(event.row_key.value)))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        if event.column_key.value is not None:
            self.sort_by(event.column_key.value)

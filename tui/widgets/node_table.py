"""The network's node table: one row per node, sortable by any column, only the rows on
screen drawn.

A Line API widget (``ScrollView.render_line``) that looks like Textual's ``DataTable`` (the
same component classes and cell rendering) but holds its rows as data: each node's cell
strings, recomputed only for the nodes whose row changed (and the ``seen`` column when the
clock moved); the order as a list of node ids, sorted on the columns' keys; column widths
from the strings. A poll that changed nothing returns before any of that, a sort is a
``list.sort`` over 1,000 keys, and drawing asks for the ~40 lines in view, cached by what
they show. (A DataTable of 1,000 rows was cleared and refilled on every sort and measured
every cell with Rich whenever one changed: a key press could wait seconds behind a poll.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size, Spacing
from textual.scroll_view import ScrollView
from textual.strip import Strip

from protocol.view_types import NodeRow

from ..messages import NodeChosen
from .node_columns import (
    COLUMNS, NAME_MAX, SEEN, STATUS_STYLE, WIDE, Column, cell_texts, fit, shown_columns, widest,
    widths,
)

__all__ = ["COLUMNS", "NodeTable", "STATUS_STYLE", "WIDE", "fit"]

_BY_KEY = {c.key: i for i, c in enumerate(COLUMNS)}
_STATUS = _BY_KEY["status"]
_HEADER = -1  # the row index of the header line (DataTable's convention, in the line meta)


class NodeTable(ScrollView, can_focus=True):
    """Rows keyed by node id; the cursor stays on its node when the order changes."""

    COMPONENT_CLASSES = {"datatable--header", "datatable--even-row", "datatable--odd-row",
                         "datatable--cursor"}
    # DataTable's own look for these components, so the table reads like the others.
    DEFAULT_CSS = """
    NodeTable {
        height: 1fr;
        background: $surface;
        color: $foreground;
        &:focus {
            background-tint: $foreground 5%;
            & > .datatable--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .datatable--header { background-tint: $foreground 5%; }
        }
        &:dark > .datatable--even-row { background: $surface-darken-1 40%; }
        & > .datatable--header { text-style: bold; background: $panel; color: $foreground; }
        &:ansi > .datatable--header { background: ansi_bright_blue; color: ansi_default; }
        & > .datatable--even-row { background: $surface-lighten-1 50%; }
        & > .datatable--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """
    BINDINGS = [
        Binding("enter", "select_cursor", "Detail"),  # shown in the footer
        Binding("up", "cursor_up", "Cursor up", show=False),
        Binding("down", "cursor_down", "Cursor down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home,ctrl+home", "first", "First", show=False),
        Binding("end,ctrl+end", "last", "Last", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.sort_key: str | None = None
        self.reverse = False
        self.rows_drawn = 0  # row lines drawn (not from cache) so far: only those on screen
        self._given: Sequence[NodeRow] | None = None  # what show() was last handed
        self._now = 0.0
        self._rows: dict[int, NodeRow] = {}
        self._text: dict[int, list[str]] = {}  # node id -> every column's text
        self._order: list[int] = []  # node ids, top to bottom
        self._cursor = 0  # index into _order
        self._shown: tuple[int, ...] = shown_columns(80)
        self._widest = [0] * len(COLUMNS)  # each column's widest text over all rows
        self._widths: list[int] = []  # content widths of the shown columns
        self._lines: LRUCache[tuple[Any, ...], Strip] = LRUCache(1024)
        self._pseudo: object = None
        self._base = Style()

    # -- the data -----------------------------------------------------------------------

    def show(self, rows: Sequence[NodeRow], now: float) -> None:
        """Take a poll's rows; nothing happens when neither they nor the clock changed."""
        if rows is self._given and now == self._now:
            return
        resort = ticked = False
        if rows is not self._given:
            fresh = {r.node_id: r for r in rows}
            for node_id, row in fresh.items():
                if self._rows.get(node_id) != row:
                    self._text[node_id] = cell_texts(row, now)
                    resort = True
            for node_id in self._rows.keys() - fresh.keys():
                del self._text[node_id]
                resort = True
            self._rows, self._given = fresh, rows
        if now != self._now:
            seen = COLUMNS[SEEN].cell
            for node_id, row in self._rows.items():
                text = self._text[node_id]
                was, text[SEEN] = text[SEEN], seen(row, now)
                ticked = ticked or was != text[SEEN]
            self._now = now
        cursor = self._cursor
        if resort:
            self._widest = widest(self._text.values())
            self._sort()
        elif ticked:  # only "seen" moved: only its width can have
            self._widest[SEEN] = max(cell_len(t[SEEN]) for t in self._text.values())
        if resort or ticked:
            self._layout()
        if self._cursor != cursor:  # its node moved in the order: keep it in view
            self._scroll_to_cursor()

    def _sort(self) -> None:
        selected = self.selected_node_id
        order = sorted(self._rows)
        if self.sort_key is not None:  # stable: ties stay in node-id order
            key = COLUMNS[_BY_KEY[self.sort_key]].sort
            rows = self._rows
            order.sort(key=lambda node_id: key(rows[node_id]), reverse=self.reverse)
        self._order = order
        if selected is not None and selected in self._rows:
            self._cursor = order.index(selected)
        self._cursor = min(self._cursor, max(len(order) - 1, 0))

    def _layout(self) -> None:
        """Columns for the width we have, their widths, and a repaint of what is in view."""
        self._shown = shown_columns(self.size.width or 80)
        labels = [self._label(COLUMNS[i]).plain for i in self._shown]
        room = self.scrollable_content_region.width or 80
        self._widths = widths(self._widest, self._shown, labels, room)
        self.virtual_size = Size(sum(self._widths) + 2 * len(self._widths), len(self._order) + 1)
        self.refresh()  # lines already drawn with the same content come from the cache

    def on_resize(self, _: events.Resize) -> None:
        self._layout()

    # -- sorting ------------------------------------------------------------------------

    def sort_by(self, key: str) -> None:
        """Sort by column ``key``; again on the same column flips the order."""
        if key == self.sort_key:
            self.reverse = not self.reverse
        else:
            self.sort_key, self.reverse = key, COLUMNS[_BY_KEY[key]].numeric
        self._resorted()

    @property
    def columns_shown(self) -> tuple[Column, ...]:
        return tuple(COLUMNS[i] for i in self._shown)

    def cycle_sort(self) -> None:
        keys = [c.key for c in self.columns_shown]
        nxt = keys[(keys.index(self.sort_key) + 1) % len(keys)] if self.sort_key else keys[0]
        self.sort_by(nxt)

    def reverse_sort(self) -> None:
        if self.sort_key is None:
            self.sort_key = self.columns_shown[0].key
        self.reverse = not self.reverse
        self._resorted()

    def _resorted(self) -> None:
        self._sort()
        self._layout()  # the header's arrow may widen a column
        self._scroll_to_cursor()

    def ordered(self) -> list[NodeRow]:
        return [self._rows[node_id] for node_id in self._order]

    # -- what is shown (tests and the footer read these) --------------------------------

    @property
    def row_count(self) -> int:
        return len(self._order)

    @property
    def cursor_row(self) -> int:
        return self._cursor

    @property
    def selected_node_id(self) -> int | None:
        return self._order[self._cursor] if self._order else None

    def header(self, key: str) -> str:
        """A column's header as shown, with the sort arrow."""
        return self._label(COLUMNS[_BY_KEY[key]]).plain

    def get_row_at(self, index: int) -> list[Text]:
        """The shown cells of the row at ``index`` (top is 0), as drawn."""
        return self._cells(self._order[index])

    def get_cell(self, node_id: str | int, key: str) -> Text:
        return self._cells(int(node_id))[self._shown.index(_BY_KEY[key])]

    def _label(self, col: Column) -> Text:
        arrow = ("▼" if self.reverse else "▲") if col.key == self.sort_key else ""
        return Text(col.label + arrow, justify="right" if col.numeric else "left")

    def _cells(self, node_id: int) -> list[Text]:
        return [Text(value, style=style, justify="right" if COLUMNS[i].numeric else "left")
                for i, (value, style) in zip(self._shown, self._shown_text(node_id))]

    def _shown_text(self, node_id: int) -> list[tuple[str, str]]:
        """The shown cells' text, cut to fit, and style."""
        text, cells = self._text[node_id], []
        for j, i in enumerate(self._shown):
            value = fit(text[i], NAME_MAX if i == 0 else self._widths[j])
            cells.append((value, STATUS_STYLE.get(value, "") if i == _STATUS else ""))
        return cells

    # -- drawing ------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._lines.clear()
        self.refresh()

    def render_lines(self, crop: Region) -> list[Strip]:
        self._pseudo = self.get_pseudo_class_state()  # focus changes the cursor's look
        self._base = self.rich_style  # once for all the lines
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self._base
        index = _HEADER if y == 0 else y - 1 + int(self.scroll_y)
        if index >= len(self._order):
            return Strip.blank(width, base)
        if index == _HEADER:
            content: tuple[str, ...] = tuple(self._label(COLUMNS[i]).plain for i in self._shown)
        else:
            content = tuple(self._text[self._order[index]][i] for i in self._shown)
        scroll_x = int(self.scroll_x)
        key = (index, content, index == self._cursor, tuple(self._widths), width, scroll_x,
               base, self._pseudo)
        strip = self._lines.get(key)
        if strip is None:
            segments = self._row_segments(index)
            strip = Strip(segments).crop(scroll_x, scroll_x + width)
            strip = strip.adjust_cell_length(width, base).simplify()
            self._lines[key] = strip
        return strip

    def _row_segments(self, index: int) -> list[Segment]:
        """One row (or the header) drawn as DataTable draws it: each cell padded by one
        blank either side, zebra stripes, the cursor's colours over the cell's own."""
        if index == _HEADER:
            row_style = self.get_component_styles("datatable--header").rich_style
            cells = [(self._label(COLUMNS[i]).plain, "") for i in self._shown]
        else:
            self.rows_drawn += 1
            part = "datatable--odd-row" if index % 2 else "datatable--even-row"
            row_style = self.get_component_styles(part).rich_style
            cells = self._shown_text(self._order[index])
        cursor = Style()
        if index == self._cursor and index != _HEADER:
            cursor = self.get_component_rich_style("datatable--cursor")
        post = Style.from_color(color=cursor.color) + Style.from_color(bgcolor=cursor.bgcolor)
        segments: list[Segment] = []
        for column, ((value, style), width) in enumerate(zip(cells, self._widths)):
            pre = row_style + Style.from_meta({"row": index, "column": column}) + cursor
            right = COLUMNS[self._shown[column]].numeric
            segments += cell_segments(value, width, right, self.app.console.get_style(style),
                                      pre, post)
        table_width = sum(self._widths) + 2 * len(self._widths)
        fill = row_style + cursor + Style.from_meta({"row": index, "column": 0,
                                                     "out_of_bounds": True})
        segments.append(Segment(" " * max(0, self.size.width - table_width), fill))
        return segments

    # -- the cursor ---------------------------------------------------------------------

    def _move_cursor(self, index: int) -> None:
        if not self._order:
            return
        index = max(0, min(index, len(self._order) - 1))
        if index != self._cursor:
            before, self._cursor = self._cursor, index
            for row in (before, index):
                self.refresh(Region(0, row + 1 - int(self.scroll_y), self.size.width, 1))
        self._scroll_to_cursor()

    def _scroll_to_cursor(self) -> None:
        if self._order:
            self.scroll_to_region(Region(int(self.scroll_x), self._cursor + 1, 1, 1),
                                  spacing=Spacing(top=1), animate=False, force=True,
                                  x_axis=False, immediate=True)

    def _page(self) -> int:
        return max(self.scrollable_content_region.height - 1, 1)  # less the header

    def action_cursor_up(self) -> None:
        self._move_cursor(self._cursor - 1)

    def action_cursor_down(self) -> None:
        self._move_cursor(self._cursor + 1)

    def action_page_up(self) -> None:
        self._move_cursor(self._cursor - self._page())

    def action_page_down(self) -> None:
        self._move_cursor(self._cursor + self._page())

    def action_first(self) -> None:
        self._move_cursor(0)

    def action_last(self) -> None:
        self._move_cursor(len(self._order) - 1)

    def action_select_cursor(self) -> None:
        if self._order:
            self.post_message(NodeChosen(self._order[self._cursor]))

    def _on_click(self, event: events.Click) -> None:
        """A header sorts by its column; a row takes the cursor, and opens when it had it."""
        meta = event.style.meta
        if "row" not in meta or "column" not in meta:
            return
        event.stop()
        row, column = meta["row"], meta["column"]
        if row == _HEADER:
            if not meta.get("out_of_bounds"):
                self.sort_by(COLUMNS[self._shown[column]].key)
        elif row == self._cursor:
            self.action_select_cursor()
        else:
            self._move_cursor(row)


def cell_segments(value: str, width: int, right: bool, style: Style, pre: Style,
                  post: Style) -> list[Segment]:
    """A one-line cell as Rich renders ``Styled(Padding(Text(value, style, justify),
    (0, 1)), pre, post)`` into ``width`` + 2 cells (what DataTable draws), without Rich's
    general machinery: some 30x faster, and the same segments (tests check both agree)."""
    gap = width - cell_len(value)
    if gap < 0:  # never with the table's own widths; cut as Rich would
        value, gap = set_cell_size(value, width), 0
    edge, inner = pre, pre + style
    if post:
        edge, inner = edge + post, inner + post
    body = " " * gap + value if right else value + " " * gap
    return [Segment(" ", edge), Segment(body, inner), Segment(" ", edge)]

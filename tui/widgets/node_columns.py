"""The node table's columns and the text of its cells, kept apart from drawing them.

Everything here is plain Python over ``NodeRow``s (no widget): the table keeps each node's
cell strings, recomputes a node's only when its row changed (and the ``seen`` column when the
clock moved), sorts on cached keys, and derives column widths from the strings, so that a poll
costs a few list passes at 1,000 nodes and drawing is left to the rows on screen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len, set_cell_size

from protocol.view_types import NodeRow

from .. import format as fmt

__all__ = ["COLUMNS", "Column", "NAME_MAX", "STATUS_STYLE", "WIDE", "cell_texts", "fit",
           "shown_columns", "widest", "widths"]

STATUS_STYLE = {"working": "bold green", "idle": "cyan", "offline": "dim", "revoked": "red"}
_STATUS_ORDER = {s: i for i, s in enumerate(STATUS_STYLE)}
NAME_MAX = 16  # a node's name is cut to this many cells
WIDE = 100  # terminal columns from which the wide-only columns show
_PADDING = 2  # one blank cell either side of every column, as Textual's DataTable draws them


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, with an ellipsis when cut."""
    return text if cell_len(text) <= width else set_cell_size(text, max(width - 1, 0)) + "…"


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
SEEN = len(COLUMNS) - 1  # the one column that moves with the clock
_INSTITUTION = 1


def shown_columns(terminal_width: int) -> tuple[int, ...]:
    """Indexes into COLUMNS of the columns a terminal this wide shows."""
    return tuple(i for i, c in enumerate(COLUMNS) if terminal_width >= WIDE or not c.wide)


def cell_texts(row: NodeRow, now: float) -> list[str]:
    """Every column's text for ``row`` (the shown ones are picked when drawing)."""
    return [c.cell(row, now) for c in COLUMNS]


def widest(cells: Iterable[list[str]]) -> list[int]:
    """The widest text of each column (all of COLUMNS) over every row, in terminal cells."""
    out = [0] * len(COLUMNS)
    for row in cells:
        for i, text in enumerate(row):
            n = cell_len(text)
            if n > out[i]:
                out[i] = n
    return out


def widths(widest_cells: list[int], shown: tuple[int, ...], labels: list[str],
           room: int) -> list[int]:
    """Content widths of the ``shown`` columns: the widest cell (``widest``) or label, names
    cut at NAME_MAX, and the institution column giving way (down to its label) so the table
    fits ``room`` cells."""
    out = [max(widest_cells[i], cell_len(label)) for i, label in zip(shown, labels)]
    name = shown.index(0)
    out[name] = min(out[name], max(NAME_MAX, cell_len(labels[name])))
    if _INSTITUTION in shown:
        inst = shown.index(_INSTITUTION)
        others = sum(w for j, w in enumerate(out) if j != inst)
        squeezed = room - others - _PADDING * len(shown)
        out[inst] = max(min(out[inst], squeezed), cell_len(labels[inst]))
    return out

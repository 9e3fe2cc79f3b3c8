"""The TUI at 1,000 nodes (tests/fixture_scale.py): a key press draws only the rows on
screen, and a poll that finds nothing new does nothing.

How fast a press shows is measured in bench/tui_scale.py, not here: a reverse sort shows in
~7 ms, a median of 26 ms (worst 0.28 s) with three busy processes on the two cores, and a
fresh-clone CI run once saw 1.26 s for the first press on a loaded machine. The old table, a
DataTable cleared and refilled on every sort, took ~260 ms unloaded and seconds while a poll
updated its cells; what made it slow, drawing all 1,000 rows, is what these tests count.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from rich.padding import Padding
from rich.style import Style
from rich.text import Text
from textual.renderables.styled import Styled

from tests.fixture_scale import ScaleRun, build_scale_ledger
from tui import LedgerSource, make_app
from tui.widgets import NodeTable
from tui.widgets.node_table import cell_segments

from .conftest import settle
from .screen import screen_lines, send_key, until

pytestmark = pytest.mark.anyio

NAME = re.compile(r"node-\d{4}")
SIZE = (120, 40)  # 38 rows of nodes on screen


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> ScaleRun:
    return build_scale_ledger(tmp_path_factory.mktemp("scale") / "ledger.db")


@pytest.fixture
def source(scale_run: ScaleRun) -> Iterator[LedgerSource]:
    src = LedgerSource.open(scale_run.url, scale_run.run_id)
    yield src
    src.close()


def in_order(lines: list[str], descending: bool) -> bool:
    names = NAME.findall("\n".join(lines))
    return len(names) > 30 and names == sorted(names, reverse=descending)


async def test_a_reverse_sort_draws_only_the_screen(
        scale_run: ScaleRun, source: LedgerSource) -> None:
    app = make_app(source, clock=lambda: scale_run.now, poll_s=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.screen.query_one(NodeTable)
        assert table.row_count == 1000
        on_screen = table.scrollable_content_region.height - 1  # less the header
        assert table.rows_drawn <= 2 * on_screen  # not 1,000
        for i in range(5):
            drawn = table.rows_drawn
            send_key(app, "r")
            await until(app, lambda lines, desc=i % 2 == 0: in_order(lines, desc), timeout=10)
            assert table.rows_drawn - drawn <= on_screen  # the new order, a screenful of it
        assert table.ordered()[0].name == "node-1000"  # the table, not only the screen


async def test_a_poll_that_finds_nothing_new_does_nothing(
        scale_run: ScaleRun, source: LedgerSource, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(source, clock=lambda: scale_run.now, poll_s=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await until(app, lambda lines: len(NAME.findall("\n".join(lines))) > 30)
        queries: list[str] = []
        for name in ("node_summaries", "accepted_work", "versions", "events", "open_leases"):
            real = getattr(source.ledger, name)
            monkeypatch.setattr(source.ledger, name,
                                lambda *a, _n=name, _r=real, **k: queries.append(_n) or _r(*a, **k))
        marks = 0
        real_mark = source.ledger.change_mark

        def counted_mark() -> object:
            nonlocal marks
            marks += 1
            return real_mark()

        monkeypatch.setattr(source.ledger, "change_mark", counted_mark)
        table = app.screen.query_one(NodeTable)
        drawn, lines = table.rows_drawn, screen_lines(app)
        for _ in range(250):  # ten polls (one each 20 ms on an idle machine)
            if marks >= 10:
                break
            await pilot.pause(0.02)
        assert marks >= 10  # it did poll
        assert queries == []  # but read no view
        assert table.rows_drawn == drawn and screen_lines(app) == lines


def test_the_fixture_builds_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    run = build_scale_ledger(tmp_path / "ledger.db")
    assert time.perf_counter() - start < 10
    source = LedgerSource.open(run.url, run.run_id)
    snap = source.fetch(run.now)
    source.close()
    assert snap.network is not None and len(snap.network.nodes) == 1000
    statuses = {r.status for r in snap.network.nodes}
    assert statuses == {"working", "idle", "offline", "revoked"}


@pytest.mark.parametrize("cursor", [False, True], ids=["row", "cursor"])
@pytest.mark.parametrize("value, width, right, style", [
    ("idle", 8, False, "cyan"), ("working", 7, False, "bold green"), ("5", 3, True, ""),
    ("204.48", 9, True, ""), ("node▼", 9, False, ""), ("", 4, True, ""),
    ("Ünï 学院", 10, False, ""), ("a name far too long", 6, False, "")])
def test_a_cell_is_drawn_as_rich_draws_it(value: str, width: int, right: bool, style: str,
                                          cursor: bool) -> None:
    """The table's own cell drawing gives DataTable's segments (so the screens look the same
    as before, snapshots included), some 30x faster."""
    console = Console(width=120, color_system="truecolor")
    look = Style(color="#fffff0", bgcolor="#0178d4", bold=True) if cursor else Style()
    pre = Style(bgcolor="#2d3740") + Style.from_meta({"row": 3, "column": 1}) + look
    post = Style.from_color(color=look.color) + Style.from_color(bgcolor=look.bgcolor)
    text = Text(value, style=style, justify="right" if right else "left")
    rich = console.render_lines(Styled(Padding(text, (0, 1)), pre_style=pre, post_style=post),
                                console.options.update_dimensions(width + 2, 1)
                                .update(no_wrap=True))[0]
    assert cell_segments(value, width, right, console.get_style(style), pre, post) == rich


async def test_keys_and_clicks_move_through_a_thousand_rows(scale_run: ScaleRun,
                                                             source: LedgerSource) -> None:
    app = make_app(source, clock=lambda: scale_run.now, poll_s=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.screen.query_one(NodeTable)
        on_screen = table.scrollable_content_region.height - 1
        await pilot.press("end")
        assert table.selected_node_id == 1000 and "node-1000" in "".join(screen_lines(app))
        await pilot.press("home", "pagedown")
        assert table.cursor_row == on_screen and table.scroll_y > 0
        await pilot.press("pageup")
        assert table.cursor_row == 0 and table.scroll_y == 0
        await pilot.click(NodeTable, offset=(2, 0))  # the "node" header: sort by name
        assert table.sort_key == "name" and table.header("name") == "node▲"
        await pilot.click(NodeTable, offset=(2, 0))
        assert table.ordered()[0].name == "node-1000"
        assert table.selected_node_id == 1 and table.cursor_row == 999  # it kept its node
        await pilot.press("home")
        await pilot.click(NodeTable, offset=(2, 3))  # the third row takes the cursor
        assert table.cursor_row == 2 and table.selected_node_id == 998
        await pilot.click(NodeTable, offset=(2, 3))  # and opens when clicked again
        await settle(pilot)
        assert getattr(app.screen, "node_id", None) == 998

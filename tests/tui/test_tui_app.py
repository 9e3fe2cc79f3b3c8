"""The TUI driven with Pilot on the fixture ledger: what each screen shows and how keys act."""

from __future__ import annotations

import re

import pytest
from textual.widgets import TabbedContent

from coordinator.ledger import Ledger
from protocol.errors import LedgerError
from tests.fixture_ledger import FixtureRun
from tui import format as fmt
from tui.screens import EventsScreen, NetworkScreen, NodeDetailScreen, ProgressScreen
from tui.widgets import Chart, CreditsTable, EventTable, NodeTable, RunHeader, UpdatesTable

from .conftest import AppFactory, settle

pytestmark = pytest.mark.anyio


def cell(table: NodeTable, node_id: int, column: str) -> str:
    return table.get_cell(str(node_id), column).plain


def names_in_order(table: NodeTable) -> list[str]:
    return [table.get_row_at(i)[0].plain for i in range(table.row_count)]


def header(app) -> str:  # type: ignore[no-untyped-def]
    return str(app.screen.query_one(RunHeader).render())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_table_numbers_agree_with_the_ledger(tui_app: AppFactory,
                                                   fixture_ledger: FixtureRun,
                                                   size: tuple[int, int]) -> None:
    app = tui_app()
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        table = app.screen.query_one(NodeTable)
        with Ledger.read_only(fixture_ledger.url) as ledger:
            summaries = ledger.node_summaries()
        assert table.row_count == len(summaries) == 4
        for s in summaries:
            assert cell(table, s.node_id, "name") == s.name
            assert cell(table, s.node_id, "accepted") == str(s.accepted)
            assert cell(table, s.node_id, "rejected") == str(s.rejected)
            assert cell(table, s.node_id, "tokens") == fmt.tokens(s.tokens)
            assert cell(table, s.node_id, "credits") == fmt.credits(s.credits)
        assert [cell(table, i, "status") for i in (1, 2, 3, 4)] == [
            "working", "idle", "offline", "offline"]
        assert cell(table, 1, "shard") == "train 4"
        assert cell(table, 2, "rate") == "75%"
        assert cell(table, 2, "seen") == "20s"
        top = header(app)
        assert "fixture-run" in top and "round 3" in top and "2/4 online" in top
        assert fmt.tokens_per_s(40_960 / 120) in top
        assert table.size.width <= size[0] and table.virtual_size.width <= size[0]


async def test_long_institution_is_cut_to_fit_80_columns(tui_app: AppFactory) -> None:
    async with tui_app().run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = pilot.app.screen.query_one(NodeTable)
        assert cell(table, 2, "institution").endswith("…")
    async with tui_app().run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        table = pilot.app.screen.query_one(NodeTable)
        assert cell(table, 2, "institution") == "Beta Institute of Technology"
        assert cell(table, 2, "eval") == fmt.tokens(7168)  # a wide-only column


async def test_enter_opens_the_selected_node_and_escape_returns(tui_app: AppFactory) -> None:
    app = tui_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("down", "enter")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, NodeDetailScreen) and screen.node_id == 2
        assert "borealis" in header(app)
        updates = screen.query_one(UpdatesTable)
        assert updates.row_count == 4
        rows = [[c.plain for c in updates.get_row_at(i)] for i in range(updates.row_count)]
        rejected = [r for r in rows if "rejected" in r]
        assert len(rejected) == 1 and rejected[0][-1].startswith("norm_bound: update norm 2500")
        summary = str(screen.query_one("#summary").render())
        assert "rejected 1 (75%)" in summary and "trained 81,920 tok" in summary
        assert screen.query_one("#history", Chart).render().plain.strip()
        await pilot.press("c")
        assert screen.query_one(TabbedContent).active == "credits"
        credits = screen.query_one(CreditsTable)
        assert credits.row_count == 3
        assert "train 40,960 tok × 1/1k" in [credits.get_row_at(i)[-1].plain for i in range(3)]
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, NetworkScreen)
        assert app.screen.query_one(NodeTable).selected_node_id == 2
        assert app.detail_node is None


async def test_sorting(tui_app: AppFactory) -> None:
    app = tui_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(NodeTable)
        assert names_in_order(table) == ["aurora", "borealis", "cygnus", "draco"]
        await pilot.press("s")  # first column: node name, A to Z
        assert table.sort_key == "name"
        await pilot.press("r")
        assert names_in_order(table) == ["draco", "cygnus", "borealis", "aurora"]
        assert table.header("name") == "node▼"
        table.sort_by("credits")  # numbers sort largest first
        await pilot.pause()
        assert names_in_order(table) == ["aurora", "borealis", "cygnus", "draco"]
        table.sort_by("credits")
        await pilot.pause()
        assert names_in_order(table) == ["draco", "cygnus", "borealis", "aurora"]
        table.sort_by("status")
        await pilot.pause()
        assert names_in_order(table)[:2] == ["aurora", "borealis"]  # working, idle first
        await pilot.press("s")  # the next column
        assert table.sort_key == "shard"


async def test_switching_screens(tui_app: AppFactory) -> None:
    app = tui_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("p")
        await settle(pilot)
        assert isinstance(app.screen, ProgressScreen)
        loss = app.screen.query_one("#loss", Chart)
        assert "v2 3.000" in str(loss.border_title)
        plot = loss.render().plain
        assert "5.500" in plot and "3.000" in plot and re.search("[\u2801-\u28ff]", plot)
        assert "█" in app.screen.query_one("#throughput", Chart).render().plain
        await pilot.press("e")
        await settle(pilot)
        assert isinstance(app.screen, EventsScreen)
        events = app.screen.query_one(EventTable)
        assert events.row_count == len(app.events) > 10
        messages = [events.get_row_at(i)[2].plain for i in range(events.row_count)]
        assert any("norm_bound" in m for m in messages)
        assert any("missed the deadline" in m for m in messages)
        assert events.cursor_row == events.row_count - 1  # follows the newest
        await pilot.press("n")
        assert isinstance(app.screen, NetworkScreen)


async def test_q_quits(tui_app: AppFactory) -> None:
    app = tui_app()
    async with app.run_test() as pilot:
        await settle(pilot)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


async def test_footer_shows_the_keys(tui_app: AppFactory) -> None:
    app = tui_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        keys = {b.binding.key for b in app.active_bindings.values() if b.binding.show}
        assert {"q", "n", "p", "e", "enter", "s", "r"} <= keys


async def test_a_failing_read_is_shown_once_and_the_app_keeps_going(
        tui_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    app = tui_app()
    async with app.run_test() as pilot:
        await settle(pilot)

        def fail(*args: object, **kwargs: object) -> None:
            raise LedgerError("ledger sqlite:///x.db failed: disk I/O error")

        monkeypatch.setattr(app.source, "fetch", fail)
        for _ in range(2):
            app.refresh_data()
            await settle(pilot)
        assert app.is_running
        assert [n.message for n in app._notifications] == [
            "ledger sqlite:///x.db failed: disk I/O error"]
        assert app.snapshot is not None  # the last good read stays on screen


async def test_an_empty_ledger_shows_empty_screens(tui_app: AppFactory, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Ledger(url).close()
    app = tui_app(url=url)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.screen.query_one(NodeTable).row_count == 0
        assert "round 0 · 0/0 online" in header(app)
        await pilot.press("enter", "p")  # nothing to open; then the progress screen
        await settle(pilot)
        assert "no model version" in app.screen.query_one("#loss", Chart).render().plain
        await pilot.press("e")
        await settle(pilot)
        assert app.screen.query_one(EventTable).row_count == 0


def test_components_text_explains_credits_and_penalties() -> None:
    from tui.widgets.node_panels import components_text
    assert components_text({"kind": "train", "tokens": 40960, "rate_per_1k": 1.0}) == \
        "train 40,960 tok × 1/1k"
    assert components_text({"kind": "penalty", "reason": "spot_check_mismatch",
                            "tokens": 40960, "rate_per_1k": 1.0, "factor": 10.0}) == \
        "penalty 10 × train 40,960 tok × 1/1k (spot_check_mismatch)"

"""The TUI against a ledger that changes under it, one it must never change, and the
contributor view that must not show anyone else."""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from coordinator.ledger import Ledger
from tests.fixture_ledger import NOW, FixtureRun
from tui import LedgerSource, format as fmt
from tui.screens import NodeDetailScreen
from tui.widgets import CreditsTable, NodeTable, UpdatesTable

from .conftest import AppFactory, settle

pytestmark = pytest.mark.anyio

TABLES = ("institutions", "invites", "nodes", "model_versions", "leases", "updates",
          "credit_entries", "events")


def fingerprint(path: Path) -> tuple[str, dict[str, int], list[str]]:
    """File bytes, row counts and the directory listing (no -wal/-shm left behind)."""
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}
    engine.dispose()
    return (hashlib.sha256(path.read_bytes()).hexdigest(), counts,
            sorted(p.name for p in path.parent.iterdir()))


async def test_the_tui_never_writes(tui_app: AppFactory, fixture_ledger_copy: FixtureRun) -> None:
    before = fingerprint(fixture_ledger_copy.path)
    app = tui_app(url=fixture_ledger_copy.url, poll_s=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.source.ledger.is_read_only
        for keys in (("s", "r"), ("down", "enter"), ("c", "u", "escape"), ("p",), ("e",), ("n",)):
            await pilot.press(*keys)
            await settle(pilot)
        await pilot.pause(0.5)  # a few more polls
        await pilot.press("q")
    assert fingerprint(fixture_ledger_copy.path) == before


def test_the_source_refuses_a_writable_ledger(fixture_ledger_copy: FixtureRun) -> None:
    with Ledger(fixture_ledger_copy.url) as writable:
        with pytest.raises(ValueError, match="read"):
            LedgerSource(writable)


async def test_numbers_change_while_the_ledger_is_written(
        tui_app: AppFactory, fixture_ledger_copy: FixtureRun) -> None:
    app = tui_app(url=fixture_ledger_copy.url, poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(NodeTable)
        assert table.get_cell("3", "accepted").plain == "2"
        assert table.get_cell("3", "status").plain == "offline"
        n_events = len(app.events)
        with Ledger(fixture_ledger_copy.url) as ledger:  # what the run loop would write
            lease = ledger.record_lease(
                run_id="fixture-run", round=3, shard_id=9, kind="train", node_id=3,
                base_version=2, nonce="f" * 32, data_start=0, data_end=40_960,
                deadline=NOW + 300, issued_at=NOW - 10)
            upd = ledger.record_update(
                lease_id=lease.id or 0, node_id=3, arrays_digest="cd" * 32, verdict="accepted",
                tokens=40_960, steps=40, loss_before=3.0, loss_after=2.5, wall_s=9.0,
                norm=18.0, received_at=NOW - 1)
            ledger.add_credit(3, upd.id or 0, 40.96, {"kind": "train", "tokens": 40_960,
                                                      "rate_per_1k": 1.0}, now=NOW - 1)
            ledger.touch_node(3, NOW - 1)
            ledger.add_event("online", "cygnus is online", node_id=3, at=NOW - 1)
            expected = next(s for s in ledger.node_summaries() if s.node_id == 3)
        for _ in range(100):
            if table.get_cell("3", "accepted").plain == "3":
                break
            await pilot.pause(0.05)
        assert table.get_cell("3", "accepted").plain == "3"
        assert table.get_cell("3", "status").plain == "idle"
        assert table.get_cell("3", "tokens").plain == fmt.tokens(expected.tokens)
        assert table.get_cell("3", "credits").plain == fmt.credits(expected.credits)
        assert len(app.events) == n_events + 1 and app.events[-1].message == "cygnus is online"
        assert "3/4 online" in str(app.screen.query_one("#run-header").render())


OTHERS = ("aurora", "cygnus", "draco", "Uni Alpha", "Gamma College")


def screen_text(app) -> str:  # type: ignore[no-untyped-def]
    """Every character on screen (from the SVG screenshot, tags and escapes removed)."""
    svg = app.export_screenshot()
    body = svg[svg.index("<g class=\"terminal-"):]  # skip the style sheet
    return html.unescape(re.sub(r"<[^>]+>", "", body)).replace("\xa0", " ")


def forbidden_words(url: str, node_id: int) -> list[str]:
    """What a contributor view of ``node_id`` must never show: the other nodes' names and
    institutions, and their credit totals."""
    with Ledger.read_only(url) as ledger:
        others = [s for s in ledger.node_summaries() if s.node_id != node_id]
    return [*OTHERS, *(fmt.credits(s.credits) for s in others if s.credits)]


async def contributor_screens(app, pilot) -> list[str]:  # type: ignore[no-untyped-def]
    """Walk a contributor app: its node's detail (4 updates), credits (3 entries), and every
    key that would lead elsewhere, which must not. Returns the screens' text."""
    await settle(pilot)
    await pilot.pause(0.2)  # a few polls
    screen = app.screen
    assert isinstance(screen, NodeDetailScreen) and screen.contributor
    assert screen.query_one(UpdatesTable).row_count == 4
    shots = [screen_text(app)]
    await pilot.press("c")
    await settle(pilot)
    assert screen.query_one(CreditsTable).row_count == 3
    shots.append(screen_text(app))
    for keys in ("n", "p", "e", "escape", "enter"):  # no way out to the network
        await pilot.press(keys)
        await settle(pilot)
        assert app.screen is screen
    shots.append(screen_text(app))
    return shots


async def test_the_contributor_view_shows_only_its_node(tui_app: AppFactory,
                                                        fixture_ledger: FixtureRun) -> None:
    forbidden = forbidden_words(fixture_ledger.url, 2)
    app = tui_app(node_id=2, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        shots = await contributor_screens(app, pilot)
        assert app.snapshot is not None and app.snapshot.network is None
        assert app.snapshot.progress is None and app.snapshot.events is None
        assert app.events == []
    assert "borealis" in shots[0] and "Beta Institute of Technology" in shots[0]
    for shot in shots:
        for word in forbidden:
            assert word not in shot, word

"""TUI test helpers: an app on the fixture ledger with a frozen clock, and a way to wait
until its reads have landed on screen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from textual.pilot import Pilot
from textual.worker import WorkerState

from tests.fixture_ledger import NOW, FixtureRun
from tui import AtomApp, LedgerSource, make_app


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Clock strings on screen do not depend on the machine's time zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def settle(pilot: Pilot[None], rounds: int = 3) -> None:
    """Let every pending read finish and its snapshot reach the widgets. (Not
    ``workers.wait_for_complete()``: it raises for a read that a newer one cancelled.)
    Generous on a loaded machine: a read may take seconds when the whole suite runs beside
    it, and a table laid out before its rows landed once showed squeezed columns."""
    busy = (WorkerState.PENDING, WorkerState.RUNNING)
    for _ in range(rounds):
        for _ in range(3000):
            if not any(w.state in busy for w in pilot.app.workers):
                break
            await asyncio.sleep(0.01)
        await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


AppFactory = Callable[..., AtomApp]


@pytest.fixture
def tui_app(fixture_ledger: FixtureRun) -> Iterator[AppFactory]:
    """``tui_app(node_id=None, url=None, poll_s=None)``: an app on the fixture ledger (or
    ``url``) at the fixture's NOW; no polling unless asked, so screens hold still."""
    sources: list[LedgerSource] = []

    def factory(*, node_id: int | None = None, url: str | None = None,
                poll_s: float | None = None) -> AtomApp:
        source = LedgerSource.open(url or fixture_ledger.url, fixture_ledger.run_id)
        sources.append(source)
        return make_app(source, node_id=node_id, clock=lambda: NOW, poll_s=poll_s)

    yield factory
    for source in sources:
        source.close()

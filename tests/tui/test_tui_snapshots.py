"""Snapshots of every screen at 80x24 and 120x40, on the fixture ledger at a frozen NOW.

After an intended change to a screen: look at it, then ``pytest tests/tui --snapshot-update``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from textual.pilot import Pilot

from .conftest import AppFactory, settle

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


def pressing(*keys: str) -> Callable[[Pilot[None]], Awaitable[None]]:
    async def run_before(pilot: Pilot[None]) -> None:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    return run_before


@pytest.mark.parametrize("size", SIZES)
def test_network(snap_compare, tui_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(tui_app(), terminal_size=size, run_before=pressing())


@pytest.mark.parametrize("size", SIZES)
def test_progress(snap_compare, tui_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(tui_app(), terminal_size=size, run_before=pressing("p"))


@pytest.mark.parametrize("size", SIZES)
def test_node_detail(snap_compare, tui_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(tui_app(), terminal_size=size, run_before=pressing("down", "enter"))


@pytest.mark.parametrize("size", SIZES)
def test_events(snap_compare, tui_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(tui_app(), terminal_size=size, run_before=pressing("e"))


@pytest.mark.parametrize("size", SIZES)
def test_contributor(snap_compare, tui_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(tui_app(node_id=2), terminal_size=size, run_before=pressing())


@pytest.mark.parametrize("size", SIZES)
def test_contributor_credits(snap_compare, tui_app: AppFactory, size: tuple[int, int]) -> None:
    assert snap_compare(tui_app(node_id=2), terminal_size=size, run_before=pressing("c"))

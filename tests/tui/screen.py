"""Reading a headless app's screen as the terminal would get it, and typing into it as a
terminal would: for timing what a key press takes to show (tests/tui/test_tui_scale.py,
bench/tui_scale.py). ``Pilot.press`` waits for the app to go idle (some 60 ms) after each
key, too long to time a key press with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from textual import events
from textual.app import App

__all__ = ["screen_cells", "screen_lines", "send_key", "until"]


def screen_lines(app: App[Any]) -> list[str]:
    """The screen's text now, composed from every widget's lines."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def screen_cells(app: App[Any]) -> list[list[tuple[str, Any]]]:
    """The screen with its styles (a moved cursor changes colours, not text)."""
    return [[(seg.text, seg.style) for seg in strip]
            for strip in app.screen._compositor.render_strips()]


def send_key(app: App[Any], key: str) -> None:
    """The key as a terminal sends it: queued for the app, not waited for."""
    event = events.Key(key, key if len(key) == 1 else None)
    event.set_sender(app)
    assert app._driver is not None
    app._driver.send_message(event)


async def until(app: App[Any], seen: Callable[[Any], bool], timeout: float = 60.0,
                read: Callable[[App[Any]], Any] = screen_lines) -> float:
    """Seconds until ``seen(read(app))`` holds, looked at every 2 ms (more often starved a
    DataTable of the idle time it measures its columns in)."""
    start = time.perf_counter()
    while not seen(read(app)):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the screen did not show it within {timeout} s")
        await asyncio.sleep(0.002)
    return time.perf_counter() - start

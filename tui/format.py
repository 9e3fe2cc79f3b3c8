"""How numbers and times look on screen: short enough for an 80-column table."""

from __future__ import annotations

import time

__all__ = ["ago", "clock", "credits", "exact", "loss", "rate", "tokens", "tokens_per_s"]

DASH = "—"


def tokens(n: int | float) -> str:
    """950, 12.3k, 1.23M, 4.5G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f}{unit}" if abs(value) < 10 else f"{value:.1f}{unit}"
    return f"{n:.0f}"


def exact(n: int) -> str:
    return f"{n:,}"


def credits(x: float) -> str:
    return f"{x:,.2f}"


def rate(r: float | None) -> str:
    return DASH if r is None else f"{r:.0%}"


def loss(x: float | None) -> str:
    return DASH if x is None else f"{x:.3f}"


def tokens_per_s(x: float) -> str:
    return f"{tokens(x)} tok/s"


def ago(at: float | None, now: float) -> str:
    """How long ago ``at`` was, in the largest whole unit: 4s, 12m, 3h, 2d."""
    if at is None:
        return DASH
    dt = max(now - at, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if dt >= size:
            return f"{int(dt // size)}{unit}"
    return f"{int(dt)}s"


def clock(at: float) -> str:
    """Local wall-clock time of day."""
    return time.strftime("%H:%M:%S", time.localtime(at))

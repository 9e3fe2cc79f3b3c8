"""Charts drawn with text: a braille line chart and a block bar chart, with axes.

The drawing functions are pure (lists of strings out) so they are tested without an app;
:class:`Chart` lays one out in whatever size its container gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

__all__ = ["Chart", "ChartData", "bar_rows", "braille_rows"]

_BRAILLE = 0x2800
# Bit of each dot in a braille cell, by (dot row 0-3, dot column 0-1).
_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_BLOCKS = " ▁▂▃▄▅▆▇█"


def _scale(v: float, lo: float, hi: float, steps: int) -> int:
    """``v`` in [lo, hi] as 0..steps-1 (hi == lo maps to the middle)."""
    if hi <= lo:
        return (steps - 1) // 2
    return min(steps - 1, max(0, round((v - lo) / (hi - lo) * (steps - 1))))


def braille_rows(xs: Sequence[float], ys: Sequence[float], width: int, height: int,
                 y_range: tuple[float, float] | None = None) -> list[str]:
    """A line through the points (xs ascending), ``height`` rows of ``width`` braille cells."""
    if width <= 0 or height <= 0:
        return []
    grid = [[0] * width for _ in range(height)]
    if xs:
        lo, hi = y_range or (min(ys), max(ys))
        x_lo, x_hi = xs[0], xs[-1]
        dots = [(_scale(x, x_lo, x_hi, width * 2) if len(xs) > 1 else 0,
                 height * 4 - 1 - _scale(y, lo, hi, height * 4)) for x, y in zip(xs, ys)]
        path = dots[:1]
        for (x0, y0), (x1, y1) in zip(dots, dots[1:]):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            path += [(x0 + round((x1 - x0) * i / n), y0 + round((y1 - y0) * i / n))
                     for i in range(1, n + 1)]
        for x, y in path:
            grid[y // 4][x // 2] |= _DOT[y % 4][x % 2]
    return ["".join(chr(_BRAILLE + c) if c else " " for c in row) for row in grid]


def _resample(values: Sequence[float], width: int) -> list[float]:
    """At most ``width`` columns: neighbouring values are averaged when there are more."""
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        part = values[i * len(values) // width:(i + 1) * len(values) // width]
        out.append(sum(part) / len(part))
    return out


def bar_rows(values: Sequence[float], width: int, height: int,
             top: float | None = None) -> list[str]:
    """One bar per value, as wide as the room allows (a gap between wide bars), ``height``
    rows at eighth-of-a-row resolution."""
    if width <= 0 or height <= 0:
        return []
    cols = _resample(values, width)
    top = top if top is not None else max(cols, default=0.0)
    bar = max(width // max(len(cols), 1), 1)
    gap = 1 if bar >= 3 else 0
    levels = []
    for v in cols:
        level = round(v / top * height * 8) if top > 0 else 0
        levels += [level] * (bar - gap) + [0] * gap
    rows = []
    for r in range(height):
        base = (height - 1 - r) * 8
        rows.append("".join(_BLOCKS[min(8, max(0, lv - base))] for lv in levels).ljust(width))
    return rows


@dataclass(frozen=True)
class ChartData:
    """What a chart shows; ``kind`` is "line" (xs matter) or "bar" (one bar per y)."""

    ys: tuple[float, ...]
    xs: tuple[float, ...] = ()
    kind: str = "line"
    x_labels: tuple[str, str] = ("", "")
    y_format: Callable[[float], str] = str
    empty: str = "no data yet"


class Chart(Widget):
    """A titled chart (set ``border_title``) over the space it is given."""

    DEFAULT_CSS = """
    Chart { border: round $primary-darken-1; height: 1fr; padding: 0 1; }
    Chart > .chart--plot { color: $success; }
    Chart > .chart--axis { color: $text-muted; }
    """
    COMPONENT_CLASSES = {"chart--plot", "chart--axis"}

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._data: ChartData | None = None

    def show(self, data: ChartData) -> None:
        if data != self._data:
            self._data = data
            self.refresh()

    def render(self) -> Text:
        data, width, height = self._data, self.content_size.width, self.content_size.height
        if data is None or not data.ys:
            return Text(data.empty if data else "", style="italic")
        axis = self.get_component_rich_style("chart--axis")
        plot_style = self.get_component_rich_style("chart--plot")
        hi = max(data.ys)
        lo = 0.0 if data.kind == "bar" else min(data.ys)
        labels = [data.y_format(hi), data.y_format(lo)]
        label_w = max(map(len, labels))
        plot_w, plot_h = max(width - label_w - 1, 1), max(height - 2, 1)
        if data.kind == "bar":
            rows = bar_rows(data.ys, plot_w, plot_h, top=hi)
        else:
            rows = braille_rows(data.xs or tuple(range(len(data.ys))), data.ys, plot_w,
                                plot_h, (lo, hi))
        text = Text(no_wrap=True, overflow="crop")
        for i, row in enumerate(rows):
            label = labels[0] if i == 0 else labels[1] if i == len(rows) - 1 else ""
            tick = "┤" if label else "│"
            text.append(f"{label:>{label_w}}{tick}", axis)
            text.append(row + "\n", plot_style)
        text.append(" " * label_w + "└" + "─" * plot_w + "\n", axis)
        left, right = data.x_labels
        gap = max(plot_w - len(left) - len(right), 1)
        text.append(" " * (label_w + 1) + left + " " * gap + right, axis)
        return text

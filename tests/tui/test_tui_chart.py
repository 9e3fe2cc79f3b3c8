"""The text charts, drawn without an app."""

from __future__ import annotations

from tui.widgets.chart import bar_rows, braille_rows

BLANK = " "


def dots(rows: list[str]) -> set[tuple[int, int]]:
    """(x, y) of every dot drawn, y = 0 at the top."""
    bits = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
    out = set()
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            code = ord(ch) - 0x2800 if ch != BLANK else 0
            for dy in range(4):
                for dx in range(2):
                    if code & bits[dy][dx]:
                        out.add((c * 2 + dx, r * 4 + dy))
    return out


def test_a_falling_line_goes_from_top_left_to_bottom_right() -> None:
    rows = braille_rows([0, 1, 2], [3.0, 2.0, 1.0], width=10, height=3)
    assert len(rows) == 3 and all(len(r) == 10 for r in rows)
    d = dots(rows)
    assert (0, 0) in d and (19, 11) in d  # corners: first point high, last point low
    ys_by_x: dict[int, list[int]] = {}
    for x, y in d:
        ys_by_x.setdefault(x, []).append(y)
    assert set(ys_by_x) == set(range(20))  # connected: a dot in every column
    tops = [min(ys_by_x[x]) for x in range(20)]
    assert tops == sorted(tops)


def test_x_positions_follow_the_x_values() -> None:
    d = dots(braille_rows([0, 9, 10], [0.0, 0.0, 1.0], width=10, height=1))
    # Flat until x=9 of 10 (dot column 17 of 19), then the rise.
    assert all(y == 3 for x, y in d if x <= 17)
    assert (19, 0) in d


def test_a_flat_or_single_point_line_is_drawn_in_the_middle() -> None:
    # Eight dot rows: the middle is row 4 from the top.
    assert dots(braille_rows([5], [1.0], width=4, height=2)) == {(0, 4)}
    assert {y for _, y in dots(braille_rows([0, 1], [2.0, 2.0], width=4, height=2))} == {4}


def test_bars_scale_to_the_top_and_fill_the_width() -> None:
    rows = bar_rows([0.0, 4.0, 8.0], width=9, height=2)
    assert [len(r) for r in rows] == [9, 9]
    # Three bars of width 3 (2 drawn + 1 gap): empty, half (a full lower row), full.
    assert rows[1] == "   ██ ██ "
    assert rows[0] == "      ██ "


def test_more_values_than_columns_are_averaged() -> None:
    rows = bar_rows([8.0, 0.0] * 10, width=5, height=1, top=8.0)
    assert rows == ["▄▄▄▄▄"]


def test_nothing_to_draw() -> None:
    assert braille_rows([], [], 5, 2) == [BLANK * 5] * 2
    assert bar_rows([], 5, 2) == [BLANK * 5] * 2
    assert braille_rows([1], [1.0], 0, 2) == [] and bar_rows([1.0], 5, 0) == []

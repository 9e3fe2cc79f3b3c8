"""Is the TUI usable at 1,000 nodes? First rows, key-press latency and idle CPU, headless.

Builds the 1,000-node ledger of ``tests/fixture_scale.py`` (5 updates per node) in a temporary
directory, opens it as ``atom-tui --db`` does (``LedgerSource``, polling every second) or,
with ``--source coordinator``, through an in-process coordinator's status service as
``atom-tui --coordinator`` does (``WatchStatus`` streams), in a headless app of 120x40, and
measures:

- ``first_rows_s``: from starting the app to the first node rows on screen;
- ``key_press_ms``: from a key press to its result on screen (the screen's composed lines,
  what the terminal would be sent): ``r`` (reverse the order; the top row flips between the
  first and the last node), ``s`` (sort by the next column) and ``down`` (cursor), p50/p99;
- ``idle_cpu_fraction``: CPU seconds (every thread of the process) per wall second over
  ``--idle`` seconds in which the ledger does not change. The clock is frozen at the ledger's
  "now" (nothing on screen changes: a poll that finds nothing new should cost nothing), or
  with ``--live`` it runs, as for a person at a terminal: then the "seen" column ticks and
  nodes go offline while the ledger holds still.

    python bench/tui_scale.py                     # 1,000 nodes
    python bench/tui_scale.py --live --json      # the clock runs, as in a terminal
    python bench/tui_scale.py --source coordinator --json
    python bench/tui_scale.py --nodes 5000 --json

Run on demand; not part of the test suite (tests/tui/test_tui_scale.py holds the bounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.rundir import init_run  # noqa: E402
from protocol.signing import load_private_key  # noqa: E402
from tests.fixture_scale import build_scale_ledger  # noqa: E402
from tests.status_world import serving  # noqa: E402
from tests.tui.screen import screen_cells, screen_lines, send_key, until  # noqa: E402
from tui import CoordinatorSource, LedgerSource, make_app  # noqa: E402
from tui.snapshot import Source  # noqa: E402

_NAME = re.compile(r"node-\d{4,}")
_STATUS = re.compile(r" (working|idle|offline|revoked) ")


def _in_order(lines: list[str], descending: bool) -> bool:
    """The node names on screen are all there (a screenful) and in that order."""
    names = _NAME.findall("\n".join(lines))
    return len(names) > 10 and names == sorted(names, reverse=descending)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


@contextmanager
def opened(kind: str, url: str, clock: Callable[[], float], tmp: Path) -> Iterator[Source]:
    """The ledger as ``atom-tui --db`` reads it, or served by an in-process coordinator's
    status service (TLS on 127.0.0.1) as ``atom-tui --coordinator`` reads it."""
    if kind == "db":
        source: Source = LedgerSource.open(url)
        yield source
        source.close()
        return
    rd = init_run(tmp / "run", run_id="scale-run")
    with serving(rd, url, clock) as address:
        source = CoordinatorSource(address, rd.tls.ca_cert.read_bytes(),
                                   load_private_key(rd.key_path), clock=clock)
        yield source
        source.close()


async def measure(url: str, now: float, nodes: int, presses: int, idle_s: float,
                  live: bool, kind: str = "db") -> dict[str, Any]:
    started = time.time()
    clock = (lambda: now + time.time() - started) if live else (lambda: now)
    with tempfile.TemporaryDirectory() as tmp, opened(kind, url, clock, Path(tmp)) as source:
        return await _measure(source, clock, nodes, presses, idle_s,
                              {"nodes": nodes, "source": kind,
                               "clock": "live" if live else "frozen"})


async def _measure(source: Source, clock: Callable[[], float], nodes: int, presses: int,
                   idle_s: float, out: dict[str, Any]) -> dict[str, Any]:
    app = make_app(source, clock=clock, poll_s=1.0)
    t0 = time.perf_counter()
    async with app.run_test(size=(120, 40)) as pilot:
        await until(app, lambda ls: sum(bool(_STATUS.search(x)) for x in ls) > 10)
        out["first_rows_s"] = round(time.perf_counter() - t0, 3)
        times: dict[str, list[float]] = {"down": [], "r": [], "s": []}
        for _ in range(presses):  # from the top row: each moves the highlight on the screen
            before = screen_cells(app)
            start = time.perf_counter()
            send_key(app, "down")
            await until(app, lambda ls, b=before: ls != b, read=screen_cells)
            times["down"].append(time.perf_counter() - start)
        for i in range(presses):  # on node order first: r sorts by name, descending
            start = time.perf_counter()
            send_key(app, "r")
            await until(app, lambda ls, desc=i % 2 == 0: _in_order(ls, desc))
            times["r"].append(time.perf_counter() - start)
        for _ in range(presses):
            before = screen_lines(app)
            start = time.perf_counter()
            send_key(app, "s")
            try:
                await until(app, lambda ls, b=before: ls != b, timeout=5.0)
            except TimeoutError:  # a sort that leaves the screen as it was: not counted
                continue
            times["s"].append(time.perf_counter() - start)
        out["key_press_ms"] = {k: {"p50": round(1000 * _pct(v, 0.5), 1),
                                   "p99": round(1000 * _pct(v, 0.99), 1)}
                               for k, v in times.items()}
        await pilot.pause(1.5)  # let the last poll land
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(idle_s)
        out["idle_cpu_fraction"] = round(
            (time.process_time() - cpu0) / (time.perf_counter() - wall0), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=5, help="per node")
    parser.add_argument("--presses", type=int, default=20, help="per key")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured")
    parser.add_argument("--live", action="store_true",
                        help="the clock runs (from the ledger's now): every second the 'seen' "
                        "column changes and nodes go offline, as in a real terminal")
    parser.add_argument("--source", choices=("db", "coordinator"), default="db",
                        help="db: the ledger, polled; coordinator: an in-process coordinator's "
                        "status stream (server and TUI in this one process)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = build_scale_ledger(Path(tmp) / "ledger.db", args.nodes, args.updates)
        built = time.perf_counter() - t
        out = asyncio.run(measure(run.url, run.now, args.nodes, args.presses, args.idle,
                                   args.live, args.source))
    out["fixture_build_s"] = round(built, 3)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()

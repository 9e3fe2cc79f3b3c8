"""What the node is doing right now, shared from the warm worker with the supervisor.

The lease runs in the warm worker's process, so the join supervisor (which owns the
terminal) learns about progress through a small JSON file the worker rewrites.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Progress", "ProgressWriter", "TransferProgress", "read_progress"]

_MIN_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Progress:
    kind: str  # "train" | "eval" | "fetch" | "idle"
    round: int
    shard_id: int
    step: int
    steps: int
    tokens: int
    tokens_per_s: float
    updated: float
    done: bool = False
    note: str = ""


class ProgressWriter:
    def __init__(self, path: Path, kind: str, round: int, shard_id: int, steps: int) -> None:
        self.path, self.kind, self.round, self.shard_id, self.steps = path, kind, round, shard_id, steps
        self.t0 = time.perf_counter()
        self._last = 0.0

    def __call__(self, step: int, steps: int, tokens: int, *, done: bool = False,
                 note: str = "") -> None:
        now = time.perf_counter()
        if not done and now - self._last < _MIN_INTERVAL_S:
            return
        self._last = now
        rate = tokens / max(now - self.t0, 1e-9)
        write_progress(self.path, Progress(self.kind, self.round, self.shard_id, step, steps,
                                           tokens, rate, time.time(), done, note))


class TransferProgress:
    """Blob transfers of one lease, shown once one has taken over a second (``note`` says
    what and how far: ``model 12.0/344.0 MB``)."""

    SHOW_AFTER_S = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._started: dict[str, float] = {}
        self._last = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.perf_counter()
        t0 = self._started.setdefault(what, now)
        if now - t0 < self.SHOW_AFTER_S or (done < total and now - self._last < _MIN_INTERVAL_S):
            return
        self._last = now
        rate = done / max(now - t0, 1e-9)
        write_progress(self.path, Progress("fetch", 0, 0, done, total, done,
                                           rate, time.time(), done >= total,
                                           f"{what} {done / 1e6:.1f}/{total / 1e6:.1f} MB"))


def write_progress(path: Path, p: Progress) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(asdict(p)))
        tmp.replace(path)
    except OSError:
        pass  # progress is cosmetic: never fail a shard over it


def read_progress(path: Path) -> Progress | None:
    try:
        return Progress(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None

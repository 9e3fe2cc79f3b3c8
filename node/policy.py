"""A node's contribution policy: when this machine may work for the network.

University GPUs are shared: a box its owner also uses by day, a GPU other jobs hold. The
policy says when the node takes work, checked when a lease arrives and between training steps
(``node.pause``); when it says no, the lease is handed back (``protocol.messages.HandBack``)
with the seconds until the node expects to be free again.

A policy file (``atom-node join --policy FILE``), every key optional::

    # local time; a window opens on each day named and may run past midnight
    windows = ["Mon-Fri 19:00-07:00", "Sat-Sun 00:00-24:00"]
    pause_when_gpu_busy = true   # another process on our GPU: hand work back
    gpu_busy_percent = 50        # ... or utilization above 50% while we are idle (0: off)
    busy_retry_s = 300           # how long a busy GPU keeps the node away
    max_gpu_memory = "40GiB"     # this process's share of the GPU's memory

A window's days name the day it *opens*: ``Mon-Fri 19:00-07:00`` covers Friday night into
Saturday 07:00, not Monday 00:00-07:00. No windows: any time. ``00:00-24:00`` is the whole
day. Pure logic: the clock and the GPU probe are injected (``node.gpu`` has the NVML one).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from protocol.errors import ConfigError

__all__ = ["Decision", "GpuProbe", "Policy", "Window", "parse_size"]

_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_MIN = 24 * 60
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# (working) -> why the GPU is busy, or None: ``working`` says a lease of ours is running,
# so our own utilization is not someone else's
GpuProbe = Callable[[bool], "str | None"]


class Decision(NamedTuple):
    ok: bool
    why: str  # one line; empty when ok
    retry_after_s: float  # when to ask again (0 when ok)


def _minutes(text: str, where: str) -> int:
    m = _TIME.fullmatch(text)
    if m is None or int(m[2]) > 59 or int(m[1]) * 60 + int(m[2]) > _DAY_MIN:
        raise ConfigError(f"{where}: {text!r} is not a time HH:MM (00:00 to 24:00)")
    return int(m[1]) * 60 + int(m[2])


def _day(text: str, where: str) -> int:
    name = text.strip().lower()
    for i, full in enumerate(_DAY_NAMES):
        if len(name) >= 3 and full.startswith(name):
            return i
    raise ConfigError(f"{where}: {text.strip()!r} is not a day (Mon, Tue, ... Sun)")


def _days(text: str, where: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        a = _day(first, where)
        b = _day(last, where) if dash else a
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps the weekend
    return frozenset(out)


@dataclass(frozen=True)
class Window:
    """Local time from ``start`` for ``length`` minutes, opening on each of ``days``
    (0 = Monday)."""

    days: frozenset[int]
    start: int  # minutes after midnight
    length: int  # minutes, 1 to a whole day
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str, label: str = "window") -> Window:
        """``"Mon-Fri 19:00-07:00"``, ``"Sat,Sun 00:00-24:00"`` or ``"22:00-06:00"``
        (every day); ``label`` starts an error's line (where the text came from)."""
        where = f"{label} {text!r}"
        if not isinstance(text, str):
            raise ConfigError(f"{where}: expected a string like \"Mon-Fri 19:00-07:00\"")
        parts = text.split()
        if len(parts) not in (1, 2):
            raise ConfigError(f"{where}: expected \"[DAYS] HH:MM-HH:MM\", e.g. "
                              "\"Mon-Fri 19:00-07:00\"")
        days = _days(parts[0], where) if len(parts) == 2 else frozenset(range(7))
        start_s, dash, end_s = parts[-1].partition("-")
        if not dash:
            raise ConfigError(f"{where}: expected a time range HH:MM-HH:MM")
        start, end = _minutes(start_s, where), _minutes(end_s, where)
        if start == _DAY_MIN:
            raise ConfigError(f"{where}: a window cannot open at 24:00")
        length = (end - start) % _DAY_MIN or (_DAY_MIN if end != start else 0)
        if length == 0:
            raise ConfigError(f"{where}: opens and closes at the same time (whole day: "
                              "00:00-24:00)")
        return cls(days, start, length, text)

    def contains(self, now: datetime) -> bool:
        minute = now.hour * 60 + now.minute + now.second / 60 + now.microsecond / 6e7
        today = now.weekday()
        # an occurrence opened today, or yesterday and still running past midnight
        return (today in self.days and 0 <= minute - self.start < self.length) or (
            (today - 1) % 7 in self.days and 0 <= minute + _DAY_MIN - self.start < self.length)

    def next_open(self, now: datetime) -> datetime:
        """The first time after ``now`` this window opens."""
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        for ahead in range(8):
            at = midnight + timedelta(days=ahead, minutes=self.start)
            if at > now and (now.weekday() + ahead) % 7 in self.days:
                return at
        raise AssertionError("a window opens at least once a week")  # days is never empty


def parse_size(value: object, where: str) -> int:
    """Bytes from ``"40GiB"``, ``"512 MB"`` or a plain integer of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n: float = value
    else:
        m = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise ConfigError(f"{where}: {value!r} is not a size like \"40GiB\" or \"512MB\"")
        n = float(m[1]) * _UNITS[(m[2] or "b").lower()]
    if n < 1 or not math.isfinite(n):
        raise ConfigError(f"{where}: must be at least one byte, got {value!r}")
    return int(n)


def _local_now() -> datetime:
    return datetime.now().astimezone()


@dataclass(frozen=True)
class Policy:
    """When this node takes work. The default allows everything."""

    windows: tuple[Window, ...] = ()
    pause_when_gpu_busy: bool = False
    gpu_busy_percent: int = 0  # 0: only other processes on the GPU count as busy
    busy_retry_s: float = 300.0
    max_gpu_memory: int = 0  # bytes; 0: no cap
    # injected: local time, and what the GPU is doing (needed with pause_when_gpu_busy)
    clock: Callable[[], datetime] = field(default=_local_now, compare=False, repr=False)
    probe: GpuProbe | None = field(default=None, compare=False, repr=False)

    _KEYS = ("windows", "pause_when_gpu_busy", "gpu_busy_percent", "busy_retry_s",
             "max_gpu_memory")

    @classmethod
    def from_toml(cls, text: str, where: str = "policy") -> Policy:
        """Parse a policy file's text; ``ConfigError`` naming the bad key."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{where}: not valid TOML ({err})") from None
        return cls.from_dict(doc, where)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "policy") -> Policy:
        """A policy from the keys of a policy file (the same names, the same checks)."""
        unknown = sorted(set(doc) - set(cls._KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: "
                              f"{', '.join(cls._KEYS)})")
        values: dict[str, Any] = {}
        if "windows" in doc:
            windows = doc["windows"]
            if not isinstance(windows, list):
                raise ConfigError(f"{where}: windows must be a list of strings like "
                                  "\"Mon-Fri 19:00-07:00\"")
            values["windows"] = tuple(Window.parse(w, f"{where}: window") for w in windows)
        if "pause_when_gpu_busy" in doc:
            if not isinstance(doc["pause_when_gpu_busy"], bool):
                raise ConfigError(f"{where}: pause_when_gpu_busy must be true or false")
            values["pause_when_gpu_busy"] = doc["pause_when_gpu_busy"]
        if "gpu_busy_percent" in doc:
            pct = doc["gpu_busy_percent"]
            if type(pct) is not int or not 0 <= pct <= 100:
                raise ConfigError(f"{where}: gpu_busy_percent must be an integer 0 to 100, "
                                  f"got {pct!r}")
            values["gpu_busy_percent"] = pct
        if "busy_retry_s" in doc:
            s = doc["busy_retry_s"]
            if type(s) not in (int, float) or not math.isfinite(s) or not 10 <= s <= 86400:
                raise ConfigError(f"{where}: busy_retry_s must be seconds from 10 to 86400, "
                                  f"got {s!r}")
            values["busy_retry_s"] = float(s)
        if "max_gpu_memory" in doc:
            values["max_gpu_memory"] = parse_size(doc["max_gpu_memory"],
                                                  f"{where}: max_gpu_memory")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The policy's keys as ``from_dict`` reads them (how ``join`` hands it to the
        worker)."""
        doc: dict[str, Any] = {
            "windows": [w.text for w in self.windows],
            "pause_when_gpu_busy": self.pause_when_gpu_busy,
            "gpu_busy_percent": self.gpu_busy_percent, "busy_retry_s": self.busy_retry_s}
        if self.max_gpu_memory:
            doc["max_gpu_memory"] = self.max_gpu_memory
        return doc

    def with_flags(self, windows: Sequence[str] = (), pause_when_gpu_busy: bool = False,
                   max_gpu_memory: str | None = None) -> Policy:
        """This policy with ``join``'s flags on top: windows given replace the file's."""
        changes: dict[str, Any] = {}
        if windows:
            changes["windows"] = tuple(Window.parse(w, "--window") for w in windows)
        if pause_when_gpu_busy:
            changes["pause_when_gpu_busy"] = True
        if max_gpu_memory is not None:
            changes["max_gpu_memory"] = parse_size(max_gpu_memory, "--max-gpu-memory")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for the terminal: what this policy does."""
        parts = [", ".join(w.text for w in self.windows) if self.windows else "any time"]
        if self.pause_when_gpu_busy:
            parts.append("pauses while others use the GPU")
        if self.max_gpu_memory:
            parts.append(f"at most {self.max_gpu_memory / 2**30:.1f} GiB of GPU memory")
        return "; ".join(parts)

    def allows(self, now: datetime | None = None, *, working: bool = False) -> Decision:
        """Whether the node may work at ``now`` (default: the clock): the time windows, then
        the GPU (``working``: a lease of ours is running, see ``GpuProbe``)."""
        now = self.clock() if now is None else now
        if self.windows and not any(w.contains(now) for w in self.windows):
            opens = min(w.next_open(now) for w in self.windows)
            wait = (opens.replace(tzinfo=None) - now.replace(tzinfo=None)).total_seconds()
            return Decision(False, f"outside this node's time windows (next opens "
                                   f"{opens:%a %H:%M})", max(wait, 1.0))
        if self.pause_when_gpu_busy and self.probe is not None:
            busy = self.probe(working)
            if busy:
                return Decision(False, busy, self.busy_retry_s)
        return Decision(True, "", 0.0)

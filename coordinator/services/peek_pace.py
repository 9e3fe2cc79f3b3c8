"""How often nodes may ask for their next work (``NextWork``): the coordinator sets the pace.

A node that has answered its lease asks the service again and again until its next lease is
issued; at a lock-step barrier every node does. Three nodes can ask every 0.05 s, ten
thousand cannot (the service is a few threads in one Python process). So each answer says
when to ask next: the number of nodes asking lately over the rate the service is willing to
spend on peeks, never below ``min_s`` (Flower's way there takes 0.5-0.8 s, so a peek more
than a few seconds apart buys nothing) nor above ``max_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["PeekPace"]


class PeekPace:
    def __init__(self, per_s: float = 400.0, min_s: float = 0.05, max_s: float = 5.0,
                 window_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.min_s, self.max_s, self.window_s = per_s, min_s, max_s, window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # asker -> when it last asked
        self._pruned = clock()

    def retry_after(self, asker: str) -> float:
        """Note that ``asker`` asked now; seconds until it should ask again."""
        now = self._clock()
        with self._lock:
            self._seen[asker] = now
            if now - self._pruned >= self.window_s:  # amortized: one pass per window
                cutoff = now - self.window_s
                self._seen = {a: t for a, t in self._seen.items() if t >= cutoff}
                self._pruned = now
            askers = len(self._seen)
        return min(self.max_s, max(self.min_s, askers / self.per_s))

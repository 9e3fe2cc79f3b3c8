"""When a lease must stop: the node's policy says pause, or the node is leaving.

``LeaseGate.check`` runs when a lease arrives and between training steps. It raises
``Paused``, which ``node.worker.do_work`` turns into a hand-back reply
(``protocol.messages.HandBack``): the step in progress finishes, the rest of the lease is
given back, and the reply goes out through the normal Flower path, so the coordinator
reissues the shard at once instead of waiting for a deadline.

The node is *leaving* once the warm worker got SIGUSR1 or SIGTERM (a batch job's time is up:
``docs/deploy/atom-node.sbatch``). That is one event for the whole process — signals are —
so it lives here, set by ``node.warm_worker`` and read by every lease's gate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.messages import MAX_REASON, HandBack, Lease

from .policy import Policy

__all__ = ["LEAVING", "LEAVING_RETRY_S", "LeaseGate", "Paused"]

LEAVING = threading.Event()
# A leaving node's SuperNode is gone within seconds; if its batch job comes back (the same
# identity, from the shared home), it is welcome again after this.
LEAVING_RETRY_S = 120.0
# NVML is asked at most this often while a lease trains (a step can take milliseconds).
_RECHECK_S = 5.0


class Paused(Exception):
    """The lease in hand goes back: ``reason`` (one line) and when to ask again."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason, self.retry_after_s = reason, retry_after_s

    def handback(self, lease: Lease) -> HandBack:
        return HandBack(nonce=lease.nonce, reason=self.reason[:MAX_REASON],
                        retry_after_s=float(self.retry_after_s))


@dataclass
class LeaseGate:
    """Whether a lease may start (``working=False``) or go on (``working=True``)."""

    policy: Policy = field(default_factory=Policy)
    leaving: threading.Event = LEAVING
    monotonic: Callable[[], float] = time.monotonic
    recheck_s: float = _RECHECK_S
    _checked: float = field(default=float("-inf"), repr=False)

    def check(self, *, working: bool) -> None:
        """Raise ``Paused`` when the lease must go back now."""
        if self.leaving.is_set():  # every step: this one is cheap and time is short
            raise Paused("the node is shutting down (its batch job ends, or it was stopped)",
                         LEAVING_RETRY_S)
        now = self.monotonic()
        if working and now - self._checked < self.recheck_s:
            return
        self._checked = now
        ok, why, retry_after_s = self.policy.allows(working=working)
        if not ok:
            raise Paused(why, retry_after_s)

"""Leases taken beside Flower: the warm worker asks the coordinator for the work issued after
the lease it last answered, instead of waiting for Flower to bring it.

Flower takes 0.5-0.8 s to bring a lease from the coordinator to the node on the loaded bench
machine (three store-and-forward hops); at every lock-step barrier every node waits that
long. The run loop also writes each lease where the coordinator's service finds it by the
nonce of the lease before it (``coordinator/run/reply_spool.py``), and an idle worker asks
for it (``NextWork``) at the pace the coordinator sets. A lease run that way is answered as
usual (the reply is signed and handed to the service), and when Flower's copy of it comes,
the worker answers that with the same reply at once: Flower stays the control plane, and
every lease it sends gets its answer through it.

Only the installed ClientApp runs either way, with the node config of the last task Flower
gave this worker (so nothing runs before Flower has started a run here and its FAB passed
the node policy), and the lease is checked as any other (``node.worker.do_work``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc
from flwr.app import Context, RecordDict

from protocol.errors import ProtocolError
from protocol.messages import content_from_bytes, parse_work, work_nonce

__all__ = ["WorkAhead"]

log = logging.getLogger("node.work_ahead")

Ask = Callable[[str, Context], tuple[bytes, float]]  # (after nonce, context) -> work, retry_s
Run = Callable[[RecordDict, Context], RecordDict]

_KEEP = 64  # answers kept for Flower's copies (a lease's copy comes within seconds)
_MIN_S, _MAX_S = 0.05, 60.0  # bounds on the coordinator's pace
_IDLE_S, _IDLE_EVERY_S = 60.0, 2.0  # idle this long (no work anywhere): ask this seldom
_OFF = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)


class WorkAhead:
    def __init__(self, ask: Ask, run: Run, clock: Callable[[], float] = time.monotonic) -> None:
        self._ask, self._run, self._clock = ask, run, clock
        self.context: Context | None = None  # the last Flower task's: its run, node config
        self.after: str | None = None  # the nonce of the lease last answered
        self.off = False  # the coordinator sends work through Flower only
        self._next_at = 0.0
        self._idle_since = clock()
        self._started: OrderedDict[str, None] = OrderedDict()  # nonces run either way
        self._answers: OrderedDict[str, RecordDict | BaseException] = OrderedDict()

    # -- the worker's Flower tasks ------------------------------------------------------
    def answer_for(self, nonce: str | None) -> RecordDict | BaseException | None:
        """What this worker already answered lease ``nonce`` with, if it ran it beside
        Flower (the reply, or what it raised); None otherwise."""
        return None if nonce is None else self._answers.get(nonce)

    def starting(self, nonce: str | None, context: Context) -> None:
        self.context = context
        if nonce is not None:
            self._remember(self._started, nonce, None)

    def finished(self, nonce: str | None) -> None:
        if nonce is not None:
            self.after, self._next_at = nonce, 0.0
        self._idle_since = self._clock()

    # -- work beside Flower -------------------------------------------------------------
    def take(self) -> RecordDict | None:
        """The next lease, if the coordinator has issued it and it is time to ask."""
        now = self._clock()
        if self.off or self.after is None or self.context is None or now < self._next_at:
            return None
        try:
            data, retry_s = self._ask(self.after, self.context)
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if code in _OFF:
                self.off = True
                log.info("work comes through Flower only: %s", err.details())  # type: ignore[attr-defined]
            self._next_at = now + 1.0
            return None
        floor = _IDLE_EVERY_S if now - self._idle_since > _IDLE_S else _MIN_S
        self._next_at = now + min(_MAX_S, max(floor, retry_s))
        if not data:
            return None
        try:
            content = content_from_bytes(data)
            nonce = parse_work(content).lease.nonce
        except ProtocolError as err:  # Flower's copy will say the same, as the lease's error
            log.warning("next work after %s unreadable: %s", self.after, err)
            self.after = None
            return None
        if nonce in self._started:  # Flower brought it first: look past it
            self.after, self._next_at = nonce, 0.0
            return None
        return content

    def run(self, content: RecordDict) -> None:
        """Run a lease ``take`` gave, keeping its answer for Flower's copy."""
        assert self.context is not None
        nonce = work_nonce(content)  # (``take`` checked it)
        self._remember(self._started, nonce, None)
        log.info("lease %s taken beside Flower", nonce)
        try:
            answer: RecordDict | BaseException = self._run(content, self.context)
        except Exception as err:  # noqa: BLE001 - Flower's copy gets the error reply
            log.warning("lease failed: %s: %s", type(err).__name__,
                        (str(err).splitlines() or [""])[0][:300])
            answer = err
        self._remember(self._answers, nonce, answer)
        self.finished(nonce)

    @staticmethod
    def _remember(into: OrderedDict, key: str, value: object) -> None:
        into[key] = value
        into.move_to_end(key)
        while len(into) > _KEEP:
            into.popitem(last=False)

"""``WatchStatus``: the status views kept current for every watcher from one change check.

While anyone watches, one thread reads the ledger's change mark every ``POLL_S`` — one cheap
statement for all watchers together (``coordinator.ledger.change_mark``) — and wakes the
watchers when it moved, or when a cached view stopped holding because a node's status turned
with the clock (``ViewCache.expire``). A woken watcher takes its view from the desk's shared
``ViewCache`` (computed once per change, by whichever watcher asks first) and sends only what
is new to it: the events after the last it sent; the network view's node rows that differ
from those it sent (``"partial": true``); the progress or node view when it differs. So
watchers that see nothing new send nothing, and no view is computed per watcher per second.

A stream ends when its client goes away (gRPC's termination callback closes the watcher,
which wakes it) or when the coordinator stops (:meth:`StatusWatch.close` ends them all); no
keepalive message is ever sent. A waiting watcher holds one of the server's threads (gRPC's
synchronous server), so at most ``MAX_WATCHERS`` watch at once: beyond, ``TooManyWatchers``
(RESOURCE_EXHAUSTED), and ``atom-tui`` falls back to polling ``GetStatus``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from protocol.errors import LedgerError, NetworkError
from protocol.status import StatusQuery
from protocol.view_types import NetworkHeader, NetworkView, NodeRow

from coordinator.services.status import StatusDesk, reply_json

__all__ = ["MAX_WATCHERS", "POLL_S", "StatusWatch", "TooManyWatchers", "Watcher"]

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the change mark is read while anyone watches
MAX_WATCHERS = 32  # streams at once (each holds a server thread); atom-tui opens 3-4
_RECHECK_S = 5.0  # a waiting watcher looks whether its client is still there this often


class TooManyWatchers(NetworkError):
    """Every watcher slot is taken (RESOURCE_EXHAUSTED): poll GetStatus instead."""


class StatusWatch:
    """The hub of every ``WatchStatus`` stream over one desk."""

    def __init__(self, desk: StatusDesk, *, poll_s: float = POLL_S,
                 max_watchers: int = MAX_WATCHERS) -> None:
        self.desk, self.poll_s, self.max_watchers = desk, poll_s, max_watchers
        self._cond = threading.Condition()
        self._generation = 0  # moves each time the ledger (or the clock) changed a view
        self._watchers: set[Watcher] = set()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, query: StatusQuery, signature: bytes,
             active: Callable[[], bool] = lambda: True) -> Watcher:
        """A new stream of ``query``'s view, once the desk admits it (its errors, else
        TooManyWatchers). ``active`` says whether the client is still there."""
        self.desk.admit(query, signature)
        self.desk.views.refresh()  # the first reply is as new as the ledger is now
        watcher = Watcher(self, query, active)
        with self._cond:
            if self._closed:
                raise NetworkError("the coordinator is stopping")
            if len(self._watchers) >= self.max_watchers:
                raise TooManyWatchers(f"{self.max_watchers} status streams are open already")
            self._watchers.add(watcher)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="status-watch",
                                                daemon=True)
                self._thread.start()
        return watcher

    def close(self) -> None:
        """End every stream (the coordinator stops) and the checking thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()

    def _leave(self, watcher: Watcher) -> None:
        with self._cond:
            self._watchers.discard(watcher)
            self._cond.notify_all()

    @property
    def watching(self) -> int:
        with self._cond:
            return len(self._watchers)

    def _run(self) -> None:
        last = None
        while True:
            with self._cond:
                if self._closed or not self._watchers:
                    self._thread = None
                    return
            try:
                mark = self.desk.views.refresh()
                turned = self.desk.views.expire(self.desk.clock())
            except LedgerError as err:  # the watchers keep what they have; try again
                log.warning("status watch: %s", err)
                mark, turned = last, False
            if mark != last or turned:
                last = mark
                with self._cond:
                    self._generation += 1
                    self._cond.notify_all()
            self._stop.wait(self.poll_s)

    def _wait(self, watcher: Watcher, seen: int) -> int | None:
        """The generation to answer, once it differs from ``seen``; None: the stream ends."""
        with self._cond:
            while True:
                if self._closed or watcher.closed or not watcher.active():
                    return None
                if self._generation != seen:
                    return self._generation
                self._cond.wait(_RECHECK_S)


class Watcher:
    """One stream: iterate for the replies' JSON; :meth:`close` (any thread) ends it."""

    def __init__(self, hub: StatusWatch, query: StatusQuery, active: Callable[[], bool]) -> None:
        self.hub, self.query, self.active = hub, query, active
        self.closed = False
        self._seen = -1  # the generation answered last (-1: nothing sent yet)
        self._more = False  # events remain past the last batch: send them without waiting
        self._last_event = max(query.since_event_id, 0)
        self._rows: dict[int, NodeRow] = {}
        self._header: NetworkHeader | None = None
        self._net: NetworkView | None = None
        self._sent: Any = None  # the (run, view) of the last progress or node reply

    def close(self) -> None:
        self.closed = True
        self.hub._leave(self)

    def __iter__(self) -> Watcher:
        return self

    def __next__(self) -> str:
        while True:
            if not self._more:
                generation = self.hub._wait(self, self._seen)
                if generation is None:
                    self.close()
                    raise StopIteration
                first, self._seen = self._seen < 0, generation
            else:
                first = False
            text = self._reply(first)
            if text is not None:
                return text

    def _reply(self, first: bool) -> str | None:
        """What is new to this stream (the whole view the first time); None: nothing."""
        views, now, view = self.hub.desk.views, self.hub.desk.clock(), self.query.view
        if view == "network":
            return self._network(views.network(now), now, first)
        if view == "events":
            events = views.events(self._last_event)
            self._more = views.mark is not None and events.last_id < views.mark.events
            if not events.events and not first:
                return None
            self._last_event = events.last_id
            return reply_json(view, now, views.run(now), events)
        sent = (views.run(now), views.progress(now) if view == "progress"
                else views.node(self.query.node_id, now))
        if not first and sent == self._sent:
            return None
        self._sent = sent
        return reply_json(view, now, *sent)

    def _network(self, net: NetworkView, now: float, first: bool) -> str | None:
        if net is self._net and not first:
            return None
        changed = tuple(r for r in net.nodes if self._rows.get(r.node_id) != r)
        self._net = net
        if not first and not changed and net.header == self._header:
            return None
        self._rows.update((r.node_id, r) for r in changed)
        self._header = net.header
        data = dataclasses.replace(net, at=now, nodes=net.nodes if first else changed)
        return reply_json("network", now, net.header.run, data, partial=not first)

"""Live mode over ``WatchStatus``: the coordinator pushes each view when it changes.

One thread per stream — network, progress and events for the team; a node's detail while its
screen is open; a contributor's own node only — reads its replies and hands the app a new
:class:`~tui.snapshot.Snapshot` for each (``on_snapshot``, called from that thread). Between
replies nothing is read and nothing is sent: the coordinator checks for changes once for all
its watchers (``coordinator.services.status_watch``).

A stream that breaks (the coordinator restarting, the network) is opened again after a pause
that doubles from 0.5 s to 10 s and starts over once a reply arrives; the events stream
resumes after the last event it got, so none is missed or shown twice. Each failure is
reported (``on_error``; the app shows a message once). A coordinator too old to know
``WatchStatus`` (UNIMPLEMENTED), or one with every stream slot taken (RESOURCE_EXHAUSTED),
sends the app back to polling ``GetStatus`` (``on_fallback``, once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from protocol.errors import AtomError
from protocol.view_types import (
    EventsView, NetworkView, NodeDetail, NodeRow, ProgressView, RunInfo,
)

from .coordinator_source import CoordinatorSource, parsed
from .snapshot import Snapshot

__all__ = ["MAX_PAUSE_S", "MIN_PAUSE_S", "StatusStream"]

MIN_PAUSE_S, MAX_PAUSE_S = 0.5, 10.0  # before opening a broken stream again
_FALLBACK = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class _Reader:
    """One stream's thread, and how to stop it."""

    view: str
    node_id: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    call: Any = None  # the open WatchStatus call (its cancel() ends the thread's wait)
    thread: threading.Thread | None = None

    def end(self) -> None:
        self.stop.set()
        if self.call is not None:
            self.call.cancel()


class StatusStream:
    """The live views of ``source`` (a :class:`~tui.coordinator_source.CoordinatorSource`)."""

    def __init__(self, source: CoordinatorSource, *, network: bool, since_event: int,
                 on_snapshot: Callable[[Snapshot], None], on_error: Callable[[str], None],
                 on_fallback: Callable[[], None]) -> None:
        self.source = source
        self.on_snapshot, self.on_error, self.on_fallback = on_snapshot, on_error, on_fallback
        self._lock = threading.Lock()
        self._closed = self._fell_back = False
        self._readers: list[_Reader] = []
        self._node: _Reader | None = None
        self._last_event = since_event
        # the latest of each view, merged into every snapshot handed on
        self._at, self._run = 0.0, RunInfo(run_id="", round=0, version=None, val_loss=None)
        self._rows: dict[int, NodeRow] = {}
        self._network: NetworkView | None = None
        self._progress: ProgressView | None = None
        self._detail: NodeDetail | None = None
        if network and source.node_id is None:  # a node's key reads its own node only
            for view in ("network", "progress", "events"):
                self._start(_Reader(view))
        if source.node_id is not None:
            self.follow_node(source.node_id)

    def follow_node(self, node_id: int | None) -> None:
        """Stream this node's detail (None: no node's), ending the previous node's stream."""
        if self.source.node_id is not None:  # a node's key: its own, whatever is asked
            node_id = self.source.node_id
        with self._lock:
            if self._closed or (self._node is not None and self._node.node_id == node_id):
                return
            old, self._node, self._detail = self._node, None, None
        if old is not None:
            old.end()
        if node_id is not None:
            reader = _Reader("node", node_id)
            with self._lock:
                self._node = reader
            self._start(reader)

    def close(self) -> None:
        """End every stream (their threads leave as their calls are cancelled)."""
        with self._lock:
            self._closed = True
            readers = list(self._readers)
        for reader in readers:
            reader.end()

    def _start(self, reader: _Reader) -> None:
        reader.thread = threading.Thread(target=self._read, args=(reader,), daemon=True,
                                         name=f"status-stream-{reader.view}")
        with self._lock:
            self._readers.append(reader)
        reader.thread.start()

    def _read(self, reader: _Reader) -> None:
        try:
            self._stream(reader)
        finally:
            with self._lock:
                self._readers.remove(reader)

    def _stream(self, reader: _Reader) -> None:
        pause = MIN_PAUSE_S
        while not reader.stop.is_set():
            since = self._last_event if reader.view == "events" else 0
            call = self.source.watch(reader.view, reader.node_id, since)
            with self._lock:
                reader.call = call
            if reader.stop.is_set():  # ended while the call was being made
                call.cancel()
                return
            try:
                for reply in call:
                    self._take(reader, *self.source.parse(reply))
                    pause = MIN_PAUSE_S
                problem = f"the coordinator at {self.source.address} ended the status stream"
            except grpc.RpcError as err:
                if reader.stop.is_set():
                    return
                if err.code() in _FALLBACK:
                    self._fall_back()
                    return
                problem = str(self.source.rpc_error(err))
                if err.code() == grpc.StatusCode.NOT_FOUND:  # no such node: asking again won't help
                    self.on_error(problem)
                    return
            except AtomError as err:  # a reply that does not parse
                call.cancel()
                problem = str(err)
            self.on_error(problem)
            reader.stop.wait(pause)
            pause = min(2 * pause, MAX_PAUSE_S)

    def _fall_back(self) -> None:
        with self._lock:
            first, self._fell_back = not self._fell_back, True
        if first:
            self.close()
            self.on_fallback()

    def _take(self, reader: _Reader, at: float, run: RunInfo, data: Any, partial: bool) -> None:
        """Merge one reply into the latest views and hand on the snapshot they make."""
        address, events = self.source.address, None  # parsed as a polled reply is
        if reader.view == "network":
            view = parsed(NetworkView, data, address)
        elif reader.view == "progress":
            progress = parsed(ProgressView, data, address)
        elif reader.view == "events":
            events = parsed(EventsView, data, address)
        else:
            detail = parsed(NodeDetail, data, address)
        with self._lock:
            if reader.stop.is_set():  # a node no longer followed, a closed stream
                return
            self._at, self._run = max(self._at, at), run
            if reader.view == "network":
                if not partial:
                    self._rows.clear()
                self._rows.update((r.node_id, r) for r in view.nodes)  # new ids come last
                self._network = NetworkView(at=view.at, header=view.header,
                                            nodes=tuple(self._rows.values()))
            elif reader.view == "progress":
                self._progress = progress
            elif reader.view == "events":
                self._last_event = max(self._last_event, events.last_id)
            else:
                self._detail = detail
            snap = Snapshot(at=self._at, run=self._run, network=self._network,
                            progress=self._progress, events=events, detail=self._detail)
        self.on_snapshot(snap)

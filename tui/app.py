"""The ATOM TUI application, built by :func:`make_app` on any source of snapshots.

A source that can stream (a coordinator's ``WatchStatus``, ``tui.status_stream``) pushes a
:class:`~tui.messages.SnapshotReady` from its reader threads whenever a view changed, and the
app's timer only moves the snapshot's clock on (so "seen 4s" keeps counting between
changes). Any other source (a ledger), or a coordinator that cannot stream, is polled by one
thread worker. Either way the app keeps the latest snapshot in a reactive attribute that every
screen watches; a snapshot equal to the last one wakes nobody. The clock is injected so tests
freeze time; ``poll_s=None`` reads once and holds still (no polling, no stream).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import WorkerState, get_current_worker

from protocol.view_types import EventRow
from protocol.errors import AtomError

from .messages import NodeChosen, PollInstead, SnapshotReady, SourceFailed
from .screens import EventsScreen, NetworkScreen, NodeDetailScreen, ProgressScreen
from .snapshot import Snapshot, Source, Stream, StreamingSource

__all__ = ["AtomApp", "ContributorApp", "NetworkApp", "make_app"]

_MAX_EVENTS = 5000


class AtomApp(App[None]):
    """What both views share: streaming or polling, the latest snapshot, the events seen
    so far."""

    TITLE = "ATOM Network"
    ENABLE_COMMAND_PALETTE = False  # nothing to command: keys are all in the footer
    BINDINGS = [Binding("q", "quit", "Quit")]

    # the screens redraw what a new snapshot changed, not the whole screen
    snapshot: reactive[Snapshot | None] = reactive(None, repaint=False)

    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time,
                 poll_s: float | None = 1.0) -> None:
        super().__init__()
        self.source, self.clock, self.poll_s = source, clock, poll_s
        self.events: list[EventRow] = []
        self.detail_node: int | None = None
        self.stream: Stream | None = None
        self._last_error = ""
        self._pushed = (0.0, 0.0)  # (the stream's last snapshot time, our clock then)

    @property
    def network_visible(self) -> bool:
        return True

    def on_mount(self) -> None:
        if self.poll_s and isinstance(self.source, StreamingSource):
            self.stream = self.source.stream(
                network=self.network_visible, since_event=0,
                on_snapshot=lambda snap: self.post_message(SnapshotReady(snap)),
                on_error=lambda error: self.post_message(SourceFailed(error)),
                on_fallback=lambda: self.post_message(PollInstead()))
            self.stream.follow_node(self.detail_node)
        else:
            self.refresh_data()
        if self.poll_s:
            self.set_interval(self.poll_s, self._tick)

    def on_unmount(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def on_poll_instead(self, _: PollInstead) -> None:
        self.stream = None
        self.refresh_data()

    def _tick(self) -> None:
        if self.stream is not None:
            self._clock_on()
        # A slow read is not restarted every tick, or it would never finish.
        elif not any(w.group == "poll" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
                     for w in self.workers):
            self.refresh_data()

    def _clock_on(self) -> None:
        """Between pushes the views hold, but the time since each node was seen grows."""
        at, then = self._pushed
        if self.snapshot is not None:
            now = at + self.clock() - then
            if now != self.snapshot.at:
                self.snapshot = dataclasses.replace(self.snapshot, at=now, events=None)

    @work(thread=True, exclusive=True, group="poll")
    def refresh_data(self) -> None:
        """Read the source (in a thread) and post what it read; stale reads are dropped."""
        worker = get_current_worker()
        since = self.events[-1].event_id if self.events else 0
        try:
            snap = self.source.fetch(self.clock(), network=self.network_visible,
                                     since_event=since, detail_node=self.detail_node)
        except AtomError as err:
            if not worker.is_cancelled:
                self.post_message(SourceFailed(str(err)))
            return
        if not worker.is_cancelled:
            self.post_message(SnapshotReady(snap))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        snap = message.snapshot
        if snap.events is not None:
            last = self.events[-1].event_id if self.events else 0
            self.events.extend(e for e in snap.events.events if e.event_id > last)
            del self.events[:-_MAX_EVENTS]
        self._last_error = ""
        self._pushed = (snap.at, self.clock())
        self.snapshot = snap

    def on_source_failed(self, message: SourceFailed) -> None:
        if message.error != self._last_error:  # say it once, not every second
            self._last_error = message.error
            self.notify(message.error, title=f"cannot read {self.source.name}", severity="error")

    def watch_node(self, node_id: int) -> None:
        """A node-detail screen opened: read that node's detail from now on."""
        self.detail_node = node_id
        if self.stream is not None:
            self.stream.follow_node(node_id)
        else:
            self.refresh_data()

    def unwatch_node(self, node_id: int) -> None:
        if self.detail_node == node_id:
            self.detail_node = None
            if self.stream is not None:
                self.stream.follow_node(None)


class NetworkApp(AtomApp):
    """The coordinator team's view: network, progress, events, and any node's detail."""

    MODES = {"network": NetworkScreen, "progress": ProgressScreen, "events": EventsScreen}
    DEFAULT_MODE = "network"
    BINDINGS = [
        Binding("n", "switch_mode('network')", "Network"),
        Binding("p", "switch_mode('progress')", "Progress"),
        Binding("e", "switch_mode('events')", "Events"),
        *AtomApp.BINDINGS,
    ]

    def on_node_chosen(self, message: NodeChosen) -> None:
        self.push_screen(NodeDetailScreen(message.node_id))


class ContributorApp(AtomApp):
    """One contributor's view: their node's detail and credits, and nothing about others."""

    def __init__(self, source: Source, node_id: int, **kwargs: object) -> None:
        super().__init__(source, **kwargs)  # type: ignore[arg-type]
        self.node_id = node_id
        self.detail_node = node_id

    @property
    def network_visible(self) -> bool:
        return False

    def get_default_screen(self) -> Screen[None]:
        return NodeDetailScreen(self.node_id, contributor=True)

    def unwatch_node(self, node_id: int) -> None:
        pass  # its only screen: keep reading


def make_app(source: Source, *, node_id: int | None = None,
             clock: Callable[[], float] = time.time, poll_s: float | None = 1.0) -> AtomApp:
    """The network view, or with ``node_id`` that node's contributor view."""
    if node_id is not None:
        return ContributorApp(source, node_id, clock=clock, poll_s=poll_s)
    return NetworkApp(source, clock=clock, poll_s=poll_s)

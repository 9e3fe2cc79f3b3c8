"""The TUI live over WatchStatus (real gRPC, TLS, 127.0.0.1): changes arrive without a poll,
a broken stream comes back without losing an event, and an older coordinator is polled."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from coordinator.ledger import Ledger
from coordinator.services.enrollment import Enroller
from coordinator.services.grpc_service import CoordinatorService
from coordinator.services.status import StatusDesk
from protocol import coordinator_pb2 as pb
from protocol.errors import AtomError
from protocol.processes import free_port
from tests.fixture_ledger import NOW, RUN_ID
from tests.status_world import CONTRIBUTOR, StatusWorld, serving, status_world, writable_world
from tui import CoordinatorSource, make_app
from tui.snapshot import Snapshot
from tui.status_stream import StatusStream
from tui.widgets import NodeTable, UpdatesTable

from .conftest import settle

__all__ = ["status_world", "writable_world"]

pytestmark = pytest.mark.anyio


class Pushed:
    """What a StatusStream hands on: snapshots, errors, a fallback."""

    def __init__(self) -> None:
        self.snapshots: queue.Queue[Snapshot] = queue.Queue()
        self.errors: list[str] = []
        self.fell_back = False

    def stream(self, source: CoordinatorSource, *, network: bool = True,
               since_event: int = 0) -> StatusStream:
        def fallback() -> None:
            self.fell_back = True

        return StatusStream(source, network=network, since_event=since_event,
                            on_snapshot=self.snapshots.put, on_error=self.errors.append,
                            on_fallback=fallback)

    def until(self, seen: Callable[[Snapshot], bool], seconds: float = 10.0) -> Snapshot:
        end = time.monotonic() + seconds
        while True:
            try:
                snap = self.snapshots.get(timeout=max(end - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError("the stream did not push it") from None
            if seen(snap):
                return snap


def no_polls(source: CoordinatorSource) -> list[Any]:
    """Make every GetStatus of ``source`` fail the test; returns the calls tried."""
    tried: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        tried.append(args)
        raise AssertionError("GetStatus was called: the stream should push")

    source._stub.GetStatus = refuse  # type: ignore[method-assign]
    return tried


def event_messages(snap: Snapshot) -> list[str]:
    return [] if snap.events is None else [e.message for e in snap.events.events]


def row(snap: Snapshot, node_id: int) -> Any:
    assert snap.network is not None
    return next(r for r in snap.network.nodes if r.node_id == node_id)


def test_changes_arrive_without_a_poll(writable_world: StatusWorld) -> None:
    source, pushed = writable_world.source(), Pushed()
    tried = no_polls(source)
    stream = pushed.stream(source)
    try:
        snap = pushed.until(lambda s: s.network is not None and s.progress is not None)
        assert row(snap, 3).status == "offline"
        with Ledger(writable_world.url) as ledger:
            ledger.touch_node(3, NOW - 2)
            ledger.add_event("online", "cygnus is back online", node_id=3, at=NOW - 2)
        snap = pushed.until(lambda s: "cygnus is back online" in event_messages(s))
        # The network and events views are separate streams, pushed in either order: when the
        # network's came first, the snapshot with the event already holds it (merged).
        if row(snap, 3).status != "idle":
            snap = pushed.until(lambda s: s.network is not None and row(s, 3).status == "idle")
        assert len(snap.network.nodes) == 4  # type: ignore[union-attr]  # merged, not replaced
        assert row(snap, 1).status == "working"
    finally:
        stream.close()
        source.close()
    assert tried == [] and pushed.errors == [] and not pushed.fell_back


def test_a_node_key_streams_its_own_node_only(status_world: StatusWorld) -> None:
    source, pushed = status_world.source(node_id=CONTRIBUTOR), Pushed()
    stream = pushed.stream(source)  # asks for the network too: a node's key reads its own
    try:
        snap = pushed.until(lambda s: s.detail is not None)
        assert snap.detail.row.name == "borealis"  # type: ignore[union-attr]
        assert snap.network is None and snap.progress is None and snap.events is None
        stream.follow_node(3)  # another node's detail: still its own
        time.sleep(0.3)
        while not pushed.snapshots.empty():
            detail = pushed.snapshots.get().detail
            assert detail is not None and detail.row.node_id == CONTRIBUTOR
        refused = source.watch("network")
        with pytest.raises(grpc.RpcError) as info:
            next(refused)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stream.close()
        source.close()
    assert pushed.errors == []


def test_a_broken_stream_comes_back_and_misses_no_event(status_world: StatusWorld,
                                                        writable_world: StatusWorld) -> None:
    port = free_port()
    url, rd = writable_world.url, writable_world.rd
    source = status_world.source(address=f"127.0.0.1:{port}")
    pushed = Pushed()
    with serving(rd, url, lambda: NOW, port=port, watch_poll_s=0.1):
        stream = pushed.stream(source)
        first = pushed.until(lambda s: s.events is not None and len(s.events.events) > 0)
        seen = event_messages(first)
    try:
        with Ledger(url) as ledger:  # written while the coordinator is down
            ledger.add_event("run", "coordinator restarted", at=NOW)
        with serving(rd, url, lambda: NOW, port=port, watch_poll_s=0.1):
            snap = pushed.until(lambda s: "coordinator restarted" in event_messages(s), 30)
            seen += event_messages(snap)
            with Ledger(url) as ledger:
                ledger.add_event("join", "after the restart", at=NOW)
            snap = pushed.until(lambda s: "after the restart" in event_messages(s))
            seen += event_messages(snap)
    finally:
        stream.close()
        source.close()
    assert len(seen) == len(set(seen)) and seen[-2:] == ["coordinator restarted",
                                                         "after the restart"]
    assert pushed.errors and not pushed.fell_back  # the break was said, then it came back


@contextmanager
def older_coordinator(world: StatusWorld) -> Iterator[str]:
    """A coordinator from before WatchStatus: its service answers GetStatus only."""
    ledger = Ledger.read_only(world.url)
    pem = world.rd.public_key_pem()
    service = CoordinatorService(Enroller(ledger, lambda key, name: 0), RUN_ID, "127.0.0.1:1",
                                 pem, status=StatusDesk(ledger, RUN_ID, pem, clock=lambda: NOW))
    handler = grpc.method_handlers_generic_handler("atom.v1.Coordinator", {
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            service.GetStatus, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    creds = grpc.ssl_server_credentials([(world.rd.tls.server_key.read_bytes(),
                                          world.rd.tls.server_cert.read_bytes())])
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        service.close()
        server.stop(grace=None).wait()
        ledger.close()


async def test_an_older_coordinator_is_polled_instead(status_world: StatusWorld) -> None:
    with older_coordinator(status_world) as address:
        source = status_world.source(address=address)
        app = make_app(source, clock=lambda: NOW, poll_s=0.05)
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(200):
                if app.stream is None and app.screen.query_one(NodeTable).row_count:
                    break
                await pilot.pause(0.05)
            assert app.stream is None  # it fell back
            assert app.screen.query_one(NodeTable).row_count == 4
            assert list(app._notifications) == []  # not an error for the user
        source.close()


async def test_the_app_follows_the_stream(writable_world: StatusWorld) -> None:
    source = writable_world.source()
    tried = no_polls(source)
    app = make_app(source, clock=lambda: NOW, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.screen.query_one(NodeTable)

        async def until(check: Callable[[], bool]) -> None:
            for _ in range(200):
                if check():
                    return
                await pilot.pause(0.05)
            raise AssertionError("the screen did not follow the stream")

        await until(lambda: table.row_count == 4)
        assert app.stream is not None and table.get_cell(3, "status").plain == "offline"
        with Ledger(writable_world.url) as ledger:
            ledger.touch_node(3, NOW - 2)
            ledger.add_event("online", "cygnus is back online", node_id=3, at=NOW - 2)
        await until(lambda: table.get_cell(3, "status").plain == "idle")
        await until(lambda: bool(app.events) and app.events[-1].message == "cygnus is back online")
        assert [e.message for e in app.events].count("cygnus is back online") == 1
        await pilot.press("down", "enter")  # borealis's detail, from its own stream
        await settle(pilot)
        await until(lambda: app.screen.query(UpdatesTable).first().row_count == 4)
        await pilot.press("escape")
        await settle(pilot)
        assert app.detail_node is None
    for _ in range(100):  # the app closed its streams as it left
        if not any(t.name.startswith("status-stream") for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name.startswith("status-stream") for t in threading.enumerate())
    source.close()
    assert tried == [] and list(app._notifications) == []


def test_a_reply_that_does_not_parse_is_an_error_not_a_crash(status_world: StatusWorld) -> None:
    source, pushed = status_world.source(), Pushed()
    real = source.parse

    def garbled(reply: Any) -> Any:
        raise AtomError("bad status reply from the test: garbled")

    source.parse = garbled  # type: ignore[method-assign]
    stream = pushed.stream(source)
    try:
        end = time.monotonic() + 5
        while not pushed.errors and time.monotonic() < end:
            time.sleep(0.02)
        assert pushed.errors and "garbled" in pushed.errors[0]
        source.parse = real  # type: ignore[method-assign]
        pushed.until(lambda s: s.network is not None)  # and it tries again
    finally:
        stream.close()
        source.close()

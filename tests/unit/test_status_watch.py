"""WatchStatus: a stream is admitted exactly as a GetStatus request is, sends the view at once
and then only what changed, and ends when its client leaves or the coordinator stops.

Real gRPC with TLS on 127.0.0.1 (tests/status_world.py); the streams that watch a ledger
being written check it every 0.1 s (``writable_world``).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.ledger import Ledger
from coordinator.services.enrollment import Enroller
from coordinator.services.grpc_service import CoordinatorService, serve
from coordinator.services.status import StatusDesk
from coordinator.services.status_watch import StatusWatch
from coordinator.services.views import EventsView, NetworkView, NodeDetail, network_view
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.processes import free_port
from protocol.signing import generate_key
from protocol.status import StatusQuery, sign_status_query
from tests.fixture_ledger import NOW, RUN_ID
from tests.status_world import CONTRIBUTOR, StatusWorld, status_world, writable_world
from tests.unit.test_status_service import CODE, call, mine, team

__all__ = ["status_world", "writable_world"]


@contextmanager
def watching(address: str, ca_pem: bytes, query: StatusQuery, key: ec.EllipticCurvePrivateKey,
             **changed: Any) -> Iterator[Any]:
    """A WatchStatus call for ``query`` signed with ``key`` (``changed`` after signing)."""
    fields = {**dataclasses.asdict(query), **changed}
    request = pb.StatusRequest(**fields, signature=sign_status_query(query, key))
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem))
    stream = pb_grpc.CoordinatorStub(channel).WatchStatus(request)
    try:
        yield stream
    finally:
        stream.cancel()
        channel.close()


def first(world: StatusWorld, query: StatusQuery, key: ec.EllipticCurvePrivateKey,
          **changed: Any) -> tuple[grpc.StatusCode, Any]:
    with watching(world.address, world.ca_pem, query, key, **changed) as stream:
        try:
            return CODE.OK, json.loads(next(stream).json)
        except grpc.RpcError as err:
            return err.code(), err.details()


class Replies:
    """A stream read by a thread of its own: its replies as they come."""

    def __init__(self, stream: Any) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        try:
            for reply in stream:
                self.queue.put(json.loads(reply.json))
        except grpc.RpcError:
            pass
        self.queue.put(None)

    def next(self, seconds: float) -> dict[str, Any] | None:
        """The next reply if one comes within ``seconds`` (None: the stream stayed silent)."""
        try:
            return self.queue.get(timeout=seconds)  # type: ignore[no-any-return]
        except queue.Empty:
            return None


def test_a_stream_is_admitted_as_a_request_is(status_world: StatusWorld) -> None:
    w = status_world
    code, doc = first(w, mine(), w.node_key)
    assert code == CODE.OK and doc["view"] == "node"
    assert NodeDetail.from_dict(doc["data"]).row.name == "borealis"
    for query in (mine("network"), mine("progress"), mine("events"), mine("node", node_id=3)):
        code, detail = first(w, query, w.node_key)
        assert code == CODE.PERMISSION_DENIED and "its own node view only" in detail, query
    for query, key, changed in ((team("network"), generate_key(), {}),
                                (team("network"), w.node_key, {}),
                                (team("network", timestamp=NOW - 301), w.coordinator_key, {}),
                                (team("events"), w.coordinator_key, {"since_event_id": 7})):
        assert first(w, query, key, **changed)[0] == CODE.UNAUTHENTICATED, (query, changed)
    assert first(w, team("node", node_id=99), w.coordinator_key)[0] == CODE.NOT_FOUND
    assert first(w, team("leaderboard"), w.coordinator_key)[0] == CODE.INVALID_ARGUMENT


def test_the_first_reply_is_what_get_status_answers(status_world: StatusWorld) -> None:
    w = status_world
    for view, kw in (("network", {}), ("progress", {}), ("events", {"since_event_id": 5}),
                     ("node", {"node_id": 3})):
        code, streamed = first(w, team(view, **kw), w.coordinator_key)
        assert code == CODE.OK and "partial" not in streamed
        assert streamed == call(w, team(view, **kw), w.coordinator_key)[1], view


def test_then_only_what_changed(writable_world: StatusWorld) -> None:
    w, key = writable_world, writable_world.coordinator_key
    with watching(w.address, w.ca_pem, team("network"), key) as net_stream, \
            watching(w.address, w.ca_pem, team("events"), key) as events_stream, \
            watching(w.address, w.ca_pem, team("progress"), key) as progress_stream:
        net, events = Replies(net_stream), Replies(events_stream)
        progress = Replies(progress_stream)
        whole = NetworkView.from_dict(net.next(5.0)["data"])  # type: ignore[index]
        last_id = EventsView.from_dict(events.next(5.0)["data"]).last_id  # type: ignore[index]
        assert progress.next(5.0)["view"] == "progress"  # type: ignore[index]
        assert net.next(0.5) is None and events.next(0.3) is None
        with Ledger(w.url) as ledger:  # what the run loop writes when cygnus comes back
            ledger.touch_node(3, NOW - 2)
            ledger.add_event("online", "cygnus is online", node_id=3, at=NOW - 2)
            expected = network_view(ledger, NOW, RUN_ID)
        changed = net.next(5.0)
        assert changed is not None and changed["partial"] is True
        rows = NetworkView.from_dict(changed["data"]).nodes
        assert [(r.name, r.status) for r in rows] == [("cygnus", "idle")]
        merged = {r.node_id: r for r in whole.nodes} | {r.node_id: r for r in rows}
        assert tuple(merged.values()) == expected.nodes
        new = events.next(5.0)
        assert new is not None and [e["message"] for e in new["data"]["events"]] == [
            "cygnus is online"]
        assert new["data"]["last_id"] == last_id + 1
        assert progress.next(0.5) is None  # nothing it shows has changed


@contextmanager
def own_service(world: StatusWorld) -> Iterator[tuple[CoordinatorService, str]]:
    """The world's ledger served by a service this test holds (to see its watchers)."""
    ledger = Ledger.read_only(world.url)
    pem = world.rd.public_key_pem()
    desk = StatusDesk(ledger, RUN_ID, pem, clock=lambda: NOW)
    service = CoordinatorService(Enroller(ledger, lambda key, name: 0), RUN_ID, "127.0.0.1:1",
                                 pem, status=desk, watch=StatusWatch(desk, poll_s=0.1))
    port = free_port()
    server = serve(service, "127.0.0.1", port, world.rd.tls.server_cert.read_bytes(),
                   world.rd.tls.server_key.read_bytes())
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        service.close()
        server.stop(grace=None).wait()
        ledger.close()


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_a_stream_ends_when_its_client_leaves_or_the_coordinator_stops(
        status_world: StatusWorld) -> None:
    w = status_world
    with own_service(w) as (service, address):
        assert service.watch is not None
        with watching(address, w.ca_pem, team("events"), w.coordinator_key) as staying:
            next(staying)
            with watching(address, w.ca_pem, team("network"), w.coordinator_key) as leaving:
                next(leaving)
                assert service.watch.watching == 2
            assert eventually(lambda: service.watch.watching == 1)  # it noticed at once
            ended = threading.Event()

            def read_to_the_end() -> None:
                for _ in staying:
                    pass
                ended.set()

            threading.Thread(target=read_to_the_end, daemon=True).start()
            start = time.monotonic()
            service.close()  # the coordinator stops
            # at once, not at the watcher's next recheck (_RECHECK_S = 5 s)
            assert ended.wait(5.0) and time.monotonic() - start < 3.0
            assert service.watch.watching == 0
        with watching(address, w.ca_pem, team("events"), w.coordinator_key) as late:
            with pytest.raises(grpc.RpcError) as info:
                next(late)
            assert info.value.code() == CODE.UNAVAILABLE  # a stopping coordinator takes none


def test_a_node_streams_its_own_view_as_it_changes(writable_world: StatusWorld) -> None:
    w = writable_world
    with watching(w.address, w.ca_pem, mine(), w.node_key) as stream:
        replies = Replies(stream)
        start = replies.next(5.0)
        assert start is not None and NodeDetail.from_dict(start["data"]).row.node_id == 2
        with Ledger(w.url) as ledger:
            ledger.touch_node(3, NOW - 1)  # another node: nothing of it reaches this stream
        assert replies.next(0.5) is None
        with Ledger(w.url) as ledger:
            ledger.touch_node(CONTRIBUTOR, NOW - 1)
        changed = replies.next(5.0)
        assert changed is not None
        assert NodeDetail.from_dict(changed["data"]).row.last_seen == NOW - 1


def test_one_check_and_one_view_for_all_watchers(writable_world: StatusWorld,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator.services.view_cache as view_cache

    w = writable_world
    computed: list[float] = []
    real_view = view_cache.network_view_until
    monkeypatch.setattr(view_cache, "network_view_until",
                        lambda *a, **k: computed.append(1) or real_view(*a, **k))
    with own_service(w) as (service, address):
        marks: list[float] = []
        ledger = service.status.ledger  # type: ignore[union-attr]
        real_mark = ledger.change_mark
        monkeypatch.setattr(ledger, "change_mark",
                            lambda: marks.append(time.monotonic()) or real_mark())
        with watching(address, w.ca_pem, team("network"), w.coordinator_key) as a, \
                watching(address, w.ca_pem, team("network"), w.coordinator_key) as b, \
                watching(address, w.ca_pem, team("network"), w.coordinator_key) as c:
            replies = [Replies(s) for s in (a, b, c)]
            assert all(r.next(5.0) is not None for r in replies)
            computed.clear()
            with Ledger(w.url) as writer:
                writer.touch_node(3, NOW - 2)
            assert all(r.next(5.0) is not None for r in replies)  # all three got the change
            assert len(computed) == 1  # computed once for the three
            del marks[:]
            time.sleep(1.0)
            assert 5 <= len(marks) <= 12  # one check each 0.1 s, not one per watcher

"""Replies and leases beside Flower: the spools, the service's pace for ``NextWork`` and the
run loop's ``SpooledTransport`` (a spooled reply answers the lease, Flower's copy is dropped;
a lease goes ahead under the nonce of the one before it, until it is answered).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from coordinator.run.reply_spool import ReplySpool, WorkSpool
from coordinator.run.transport import Outgoing, Reply, SpooledTransport
from coordinator.services.peek_pace import PeekPace
from protocol.errors import ProtocolError
from protocol.messages import MAX_REPLY_BYTES, content_from_bytes, content_to_bytes, work_nonce

A, B = "a" * 32, "b" * 32


def test_the_spool_keeps_one_reply_per_lease_until_it_is_taken(tmp_path: Path) -> None:
    spool = ReplySpool(tmp_path / "replies")
    spool.put(A, b"first")
    spool.put(A, b"second")  # a later one replaces it
    spool.put(B, b"other")
    assert spool.take([A, "c" * 32]) == {A: b"second"}
    assert spool.take([A]) == {} and spool.take([B]) == {B: b"other"}
    assert os.listdir(tmp_path / "replies") == []  # nothing half-written left behind
    with pytest.raises(ProtocolError, match="32 lowercase hex"):
        spool.put("../../etc/passwd", b"x")
    with pytest.raises(ProtocolError, match="over the limit"):
        spool.put(A, bytes(MAX_REPLY_BYTES + 1))


def test_the_spool_sweeps_only_what_waited_too_long(tmp_path: Path) -> None:
    spool = ReplySpool(tmp_path)
    spool.put(A, b"old")
    spool.put(B, b"new")
    past = time.time() - 7200
    os.utime(tmp_path / A, (past, past))
    assert spool.sweep(3600) == 1 and spool.take([A, B]) == {B: b"new"}


def _content(nonce: str) -> RecordDict:
    return RecordDict({"work": ConfigRecord({"lease.nonce": nonce})})


def _reply(nonce: str, via: str) -> RecordDict:
    return RecordDict({"update": ConfigRecord({"nonce": nonce, "via": via})})


class FakeFlower:
    def __init__(self) -> None:
        self.sent: dict[str, str] = {}  # msg id -> nonce
        self.answered: dict[str, RecordDict] = {}  # replies in the SuperLink, by msg id
        self.asked: list[tuple[str, set[str]]] = []  # (thread, msg ids)

    def online(self) -> list[int]:
        return [1, 2]

    def send(self, msgs: Sequence[Outgoing]) -> list[str]:
        mids = []
        for m in msgs:
            mids.append(mid := f"m{len(self.sent)}")
            self.sent[mid] = work_nonce(m.content)
        return mids

    def poll(self, msg_ids: Collection[str]) -> list[Reply]:
        self.asked.append((threading.current_thread().name, set(msg_ids)))
        return [Reply(m, 1, self.answered.pop(m), None) for m in list(msg_ids)
                if m in self.answered]


def test_a_spooled_reply_answers_first_and_flower_s_copy_is_drained_beside(
        tmp_path: Path) -> None:
    flower, spool = FakeFlower(), ReplySpool(tmp_path)
    t = SpooledTransport(flower, spool, drain_every_s=0.02)
    train, evaluation = t.send([Outgoing(1, "train", _content(A), 60),
                                Outgoing(2, "eval", _content(B), 60)])
    assert t.poll([train, evaluation]) == []
    spool.put(A, content_to_bytes(_reply(A, "spool")))
    (got,) = t.poll([train, evaluation])
    after = len(flower.asked)
    assert (got.msg_id, got.src, got.error) == (train, 1, None)
    assert got.content["update"]["via"] == "spool"  # type: ignore[index]
    flower.answered[evaluation] = _reply(B, "flower")  # this one came through Flower first
    (got,) = t.poll([evaluation])
    assert got.msg_id == evaluation and got.content["update"]["via"] == "flower"  # type: ignore[index]
    flower.answered[train] = _reply(A, "flower")  # Flower's copy comes: drained, not seen
    deadline = time.monotonic() + 5
    while len(t.drain) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(t.drain) == 0 and train not in flower.answered
    # once answered, the loop never asked for it again: the drain did, on its own thread
    assert not any(train in ids for who, ids in flower.asked[after - 1:] if who == "MainThread")
    assert any(train in ids for who, ids in flower.asked if who == "flower-drain")
    spool.put(B, content_to_bytes(_reply(B, "spool")))  # late: its lease waits no more
    assert t.poll([]) == [] and spool.take([B])  # (left for the sweep)
    t.close()


def test_a_spooled_copy_that_lands_while_flower_is_asked_is_not_left_behind(
        tmp_path: Path) -> None:
    class Racing(FakeFlower):
        def poll(self, msg_ids: Collection[str]) -> list[Reply]:
            spool.put(A, content_to_bytes(_reply(A, "spool")))  # just after the spool's read
            return super().poll(msg_ids)

    flower, spool = Racing(), ReplySpool(tmp_path)
    t = SpooledTransport(flower, spool)
    [train] = t.send([Outgoing(1, "train", _content(A), 60)])
    flower.answered[train] = _reply(A, "flower")
    (got,) = t.poll([train])
    assert got.content["update"]["via"] == "flower"  # type: ignore[index]
    assert os.listdir(tmp_path) == []  # the copy was dropped, not left for the sweep
    t.close()


def test_bytes_that_are_not_a_reply_leave_the_lease_to_flower(tmp_path: Path) -> None:
    flower, spool = FakeFlower(), ReplySpool(tmp_path)
    t = SpooledTransport(flower, spool)
    [train] = t.send([Outgoing(1, "train", _content(A), 60)])
    spool.put(A, b"\xff\x00 not a record dict")
    assert t.poll([train]) == [] and spool.take([A]) == {}
    flower.answered[train] = _reply(A, "flower")
    (got,) = t.poll([train])
    assert got.content["update"]["via"] == "flower"  # type: ignore[index]


def test_reply_bytes_round_trip_and_garbage_is_a_protocol_error() -> None:
    content = _reply(A, "x")
    assert content_from_bytes(content_to_bytes(content)) == content
    with pytest.raises(ProtocolError, match="not a record dict"):
        content_from_bytes(b"\xff\x00garbage")


def test_flower_is_asked_at_most_every_flower_every_s_and_the_spool_at_every_poll(
        tmp_path: Path) -> None:
    now = [0.0]
    flower, spool = FakeFlower(), ReplySpool(tmp_path)
    t = SpooledTransport(flower, spool, flower_every_s=0.2, clock=lambda: now[0])
    train, evaluation = t.send([Outgoing(1, "train", _content(A), 60),
                                Outgoing(2, "eval", _content(B), 60)])
    assert t.poll([train, evaluation]) == [] and len(flower.asked) == 1
    flower.answered[evaluation] = _reply(B, "flower")
    now[0] = 0.05
    spool.put(A, content_to_bytes(_reply(A, "spool")))
    (got,) = t.poll([train, evaluation])  # the spool's, without a round trip to Flower
    assert got.msg_id == train and len(flower.asked) == 1
    now[0] = 0.2
    (got,) = t.poll([evaluation])
    assert got.msg_id == evaluation and len(flower.asked) == 2
    t.close()


def test_each_lease_goes_ahead_under_the_nonce_of_the_lease_sent_to_its_node_before(
        tmp_path: Path) -> None:
    flower, spool, ahead = FakeFlower(), ReplySpool(tmp_path / "r"), WorkSpool(tmp_path / "w")
    t = SpooledTransport(flower, spool, ahead=ahead)
    C, D, E = "c" * 32, "d" * 32, "e" * 32
    [first] = t.send([Outgoing(1, "train", _content(A), 60)])
    assert os.listdir(tmp_path / "w") == []  # the node's first lease: Flower alone
    ev, train, other = t.send([Outgoing(1, "eval", _content(B), 60),
                               Outgoing(1, "train", _content(C), 60),
                               Outgoing(2, "train", _content(D), 60)])
    assert content_from_bytes(ahead.get(A)) == _content(B)  # type: ignore[arg-type]
    assert content_from_bytes(ahead.get(B)) == _content(C)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path / "w")) == [A, B]
    # answered by the spool: gone from ahead; no longer waited for: gone too
    spool.put(B, content_to_bytes(_reply(B, "spool")))
    assert [r.msg_id for r in t.poll([first, ev, train, other])] == [ev]
    assert ahead.get(A) is None and ahead.get(B) is not None
    assert t.poll([first, other]) == [] and ahead.get(B) is None
    [nxt] = t.send([Outgoing(2, "eval", _content(E), 60)])
    assert content_from_bytes(ahead.get(D)) == _content(E)  # type: ignore[arg-type]
    t.close()  # the run is over: nothing left for a node to take
    assert os.listdir(tmp_path / "w") == []


def test_a_lease_flower_refused_or_could_not_take_is_not_left_ahead(tmp_path: Path) -> None:
    class Refusing(FakeFlower):
        def send(self, msgs: Sequence[Outgoing]) -> list[str | None]:  # type: ignore[override]
            return [None for _ in msgs]

    ahead = WorkSpool(tmp_path / "w")
    t = SpooledTransport(Refusing(), ReplySpool(tmp_path / "r"), ahead=ahead)
    t._last_sent[1] = A  # (as after a lease sent before)
    assert t.send([Outgoing(1, "train", _content(B), 60)]) == [None]
    assert os.listdir(tmp_path / "w") == []
    t.close()

    class Down(FakeFlower):
        def send(self, msgs: Sequence[Outgoing]) -> list[str | None]:  # type: ignore[override]
            raise ConnectionError("the SuperLink is down")

    t = SpooledTransport(Down(), ReplySpool(tmp_path / "r"), ahead=ahead)
    t._last_sent[1] = A
    with pytest.raises(ConnectionError):
        t.send([Outgoing(1, "train", _content(B), 60)])
    # nothing left to take beside Flower, and the next lease goes after A again
    assert os.listdir(tmp_path / "w") == [] and t._last_sent == {1: A}
    t.close()


def test_the_work_spool_is_read_by_nonce_not_taken_and_refuses_bad_names(
        tmp_path: Path) -> None:
    ahead = WorkSpool(tmp_path)
    assert ahead.get(A) is None
    ahead.put(A, b"work")
    assert ahead.get(A) == b"work" and ahead.get(A) == b"work"
    ahead.drop(A)
    ahead.drop(A)  # (twice: no error)
    assert ahead.get(A) is None
    with pytest.raises(ProtocolError, match="next work: the lease nonce"):
        ahead.get("../replies/" + A)
    with pytest.raises(ProtocolError, match="next work of .* over the limit"):
        ahead.put(A, bytes(MAX_REPLY_BYTES + 1))


def test_the_peek_pace_spreads_many_askers_and_forgets_the_gone() -> None:
    now = [0.0]
    pace = PeekPace(per_s=400.0, min_s=0.05, max_s=5.0, window_s=2.0, clock=lambda: now[0])
    assert pace.retry_after("n0") == 0.05  # three nodes ask every 0.05 s
    for i in range(1000):
        last = pace.retry_after(f"n{i}")
    assert last == 2.5  # 1,000 askers at 400 a second
    for i in range(10_000):
        last = pace.retry_after(f"m{i}")
    assert last == 5.0  # never slower than max_s
    now[0] = 2.5  # they are gone (their leases came)
    assert pace.retry_after("n0") == 0.05

"""How the run loop reaches nodes: a small interface, with Flower's Grid behind it.

The loop only needs "who is online", "send this", "what came back"; keeping that behind an
interface lets tests drive the real loop with in-process nodes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from protocol.errors import BlobError, ProtocolError
from protocol.messages import content_from_bytes, content_to_bytes, work_nonce

from coordinator.run.reply_spool import ReplySpool, WorkSpool

__all__ = ["FlowerTransport", "Outgoing", "Reply", "SpooledTransport", "Transport",
           "MESSAGE_TYPES"]

log = logging.getLogger(__name__)

# Flower routes "<action>.<name>" to @app.<action>("<name>") on the ClientApp.
# A tasks lease is an evaluation too: the node's evaluate handler reads its kind off the lease.
MESSAGE_TYPES = {"train": "train.shard", "eval": "evaluate.shard", "tasks": "evaluate.shard"}


@dataclass(frozen=True)
class Reply:
    msg_id: str
    src: int  # Flower node id
    content: RecordDict | None
    error: str | None  # set when the node (or Flower) answered with an error


@dataclass(frozen=True)
class Outgoing:
    dst: int  # Flower node id
    kind: str  # the lease's kind (``MESSAGE_TYPES``)
    content: RecordDict
    ttl: float  # seconds


class Transport(Protocol):
    def online(self) -> list[int]: ...

    def send(self, msgs: Sequence[Outgoing]) -> list[str | None]:
        """Send ``msgs`` (in order: a node runs its messages as they come); their ids, None
        for a message the transport refused."""
        ...

    def poll(self, msg_ids: Collection[str]) -> list[Reply]: ...


@dataclass
class FlowerTransport:
    grid: Grid

    def online(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def send(self, msgs: Sequence[Outgoing]) -> list[str | None]:
        # One push for all: a pass's messages go up in one request and their objects
        # together (the same records, e.g. the model's architecture, once). One push per
        # message took ~0.25 s each on the 2-core bench, so the last node of a lock-step
        # round got its lease ~1.5 s after the first.
        return list(self.grid.push_messages([
            Message(content=m.content, dst_node_id=m.dst, message_type=MESSAGE_TYPES[m.kind],
                    ttl=max(m.ttl, 10.0)) for m in msgs]))

    def poll(self, msg_ids: Collection[str]) -> list[Reply]:
        if not msg_ids:
            return []
        out = []
        for msg in self.grid.pull_messages(list(msg_ids)):
            md = msg.metadata
            if msg.has_error():
                out.append(Reply(md.reply_to_message_id, int(md.src_node_id), None,
                                 f"{msg.error.reason} (code {msg.error.code})"))
            else:
                out.append(Reply(md.reply_to_message_id, int(md.src_node_id), msg.content, None))
        return out


_DRAIN_S = 3600.0  # Flower's copy of a reply taken from the spool: asked for this long
_SWEEP_EVERY = 300  # polls between sweeps of spooled replies no lease waits for


class _Drain:
    """Flower's copies of replies already taken from the spool, pulled and dropped by a
    thread of its own (Flower would otherwise keep them): the run loop does not wait on
    Flower's per-object pulls for bytes it has. On the bench network those pulls were the
    loop's largest wait. Its ids and the loop's are disjoint, so the two never ask Flower
    for the same message."""

    def __init__(self, inner: Transport, every_s: float) -> None:
        self._inner, self._every_s = inner, every_s
        self._lock = threading.Lock()
        self._ids: dict[str, float] = {}  # msg id -> when its reply came from the spool
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, mid: str) -> None:
        with self._lock:
            self._ids[mid] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="flower-drain")
                self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            with self._lock:
                ids = list(self._ids)
            if not ids:
                continue
            try:
                got = self._inner.poll(ids)
            except Exception as err:  # noqa: BLE001 - the next pass asks again
                log.info("could not drain Flower's copies of replies: %s", err)
                continue
            old = time.monotonic() - _DRAIN_S
            with self._lock:
                for reply in got:
                    self._ids.pop(reply.msg_id, None)
                self._ids = {m: t for m, t in self._ids.items() if t >= old}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass
class SpooledTransport:
    """``inner`` (Flower), with replies taken from ``spool`` as soon as a node hands them to
    the coordinator's service (``coordinator.run.reply_spool``); Flower's copy, when it
    comes, is drained beside the loop (``_Drain``). Bytes that are not a reply are dropped:
    Flower's copy, the node's own reply, answers the lease then.

    With ``ahead``, each lease sent also goes there, named by the nonce of the lease sent to
    the same node before it: a node that has answered that one takes the next from the
    service as soon as it is issued, without waiting for Flower to bring it. It stays there
    until its lease is answered or no longer waited for."""

    inner: Transport
    spool: ReplySpool
    drain_every_s: float = 1.0
    # Flower is asked at most this often (the spool at every poll): a Flower poll is a
    # round trip through the SuperLink, and nearly every reply comes by the spool, so the
    # loop can look for replies every 0.05 s without asking the SuperLink 20 times a second
    flower_every_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    ahead: WorkSpool | None = None
    _leases: dict[str, tuple[str, int]] = field(default_factory=dict)  # msg id -> (nonce, dst)
    _last_sent: dict[int, str] = field(default_factory=dict)  # dst -> its last lease's nonce
    _ahead_names: dict[str, str] = field(default_factory=dict)  # msg id -> its name in ahead
    _polls: int = 0
    _flower_at: float = -math.inf  # when Flower was last asked

    def __post_init__(self) -> None:
        self.drain = _Drain(self.inner, self.drain_every_s)

    def online(self) -> list[int]:
        return self.inner.online()

    def send(self, msgs: Sequence[Outgoing]) -> list[str | None]:
        nonces = [work_nonce(m.content) for m in msgs]
        last = dict(self._last_sent)
        # before Flower's push, so the node may have it first
        names = [self._put_ahead(m, nonce) for m, nonce in zip(msgs, nonces)]
        try:
            mids = self.inner.send(msgs)
        except BaseException:  # none of them went: none may be taken beside Flower
            self._last_sent = last
            self._drop_ahead(names)
            raise
        self._drop_ahead([name for mid, name in zip(mids, names) if mid is None])
        for mid, m, nonce, name in zip(mids, msgs, nonces, names):
            if mid is None:
                continue
            self._leases[mid] = (nonce, m.dst)
            if name is not None:
                self._ahead_names[mid] = name
        return mids

    def _put_ahead(self, m: Outgoing, nonce: str) -> str | None:
        prev, self._last_sent[m.dst] = self._last_sent.get(m.dst), nonce
        if self.ahead is None or prev is None:
            return None
        try:
            self.ahead.put(prev, content_to_bytes(m.content))
        except (BlobError, ProtocolError) as err:
            log.info("lease %s goes by Flower only: %s", nonce, err)
            return None
        return prev

    def _settled(self, mid: str) -> None:
        """Lease ``mid`` answered or given up: its work leaves the ahead spool."""
        self._leases.pop(mid, None)
        self._drop_ahead([self._ahead_names.pop(mid, None)])

    def _drop_ahead(self, names: Sequence[str | None]) -> None:
        for name in names:
            if name is not None and self.ahead is not None:
                self.ahead.drop(name)

    def poll(self, msg_ids: Collection[str]) -> list[Reply]:
        waiting = set(msg_ids)
        for mid in [m for m in self._leases if m not in waiting]:
            self._settled(mid)  # answered through Flower, or expired
        out = []
        nonces = {self._leases[m][0]: m for m in waiting if m in self._leases}
        for nonce, data in self.spool.take(nonces).items() if nonces else ():
            mid = nonces[nonce]
            try:
                content = content_from_bytes(data)
            except ProtocolError as err:
                log.warning("a spooled reply to lease %s dropped: %s", nonce, err)
                continue
            out.append(Reply(mid, self._leases[mid][1], content, None))
            self._settled(mid)
            self.drain.add(mid)
        answered = {r.msg_id for r in out}
        if (now := self.clock()) - self._flower_at >= self.flower_every_s:
            self._flower_at = now
            flower = self.inner.poll([m for m in waiting if m not in answered])
            # the node hands its reply to the service before Flower's way back, but the spool
            # was read before Flower was asked: a copy that landed in between is dropped here
            # (else it waits for the sweep)
            late = [self._leases[r.msg_id][0] for r in flower if r.msg_id in self._leases]
            if late:
                self.spool.take(late)
            out.extend(flower)
        self._polls += 1
        if self._polls % _SWEEP_EVERY == 0:
            self.spool.sweep()
            if self.ahead is not None:
                self.ahead.sweep()
        return out

    def close(self) -> None:
        for mid in list(self._ahead_names):
            self._settled(mid)
        self.drain.close()

"""An in-process network for driving the real run loop: enrolled fake nodes behind a fake
``Transport``, on a fake clock that only moves when the loop sleeps.

Each node has a behaviour. ``honest`` runs ``node.worker.do_work`` for real; the others are the
ways a node can go wrong that the coordinator must survive::

    honest     do the work, sign it with the node's own key
    wrong_key  do the work, sign it with another key               -> bad_signature
    tamper     change an array after signing                       -> digest_mismatch
    nan        NaN in an array, digest and signature made over it  -> non_finite
    replay     send the previous train reply again                 -> lease_mismatch
    late       do the work, deliver it only after the deadline     -> late
    silent     never answer                                        -> lease expires
    error      answer with an error (as Flower does when the ClientApp raises)

A misbehaviour applies to the message kinds in ``FakeNode.on`` (train only by default); for
the other kinds the node is honest, so one node can e.g. train well but go silent in eval.
Replies are made when the loop polls, so they arrive at the earliest on the poll after the send.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from coordinator.ledger import Ledger, Node
from coordinator.transport import Reply
from node.worker import WorkerSettings, do_work
from protocol.digest import digest_arrays
from protocol.messages import Lease, parse_reply, parse_work, reply_content
from protocol.signing import fingerprint, generate_key, public_key_pem, sign_update

__all__ = ["BEHAVIOURS", "FakeClock", "FakeNode", "FakeTransport", "Sent", "enroll"]

BEHAVIOURS = ("honest", "wrong_key", "tamper", "nan", "replay", "late", "silent", "error")
T0 = 1_700_000_000.0


class FakeClock:
    """``clock()`` and ``sleep(dt)`` for the loop: time moves only when someone sleeps.

    ``limit_s`` guards against a loop that would wait forever: sleeping past it raises.
    """

    def __init__(self, start: float = T0, limit_s: float = 3600.0) -> None:
        self.now, self.start, self.limit_s = start, start, limit_s
        self.slept = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt
        self.slept += 1
        if self.now - self.start > self.limit_s:
            raise RuntimeError(f"fake clock ran past {self.limit_s} s: the loop never finished")


@dataclass
class FakeNode:
    """One enrolled node: its ledger row, key and behaviour, and what it has answered."""

    name: str
    flower_id: int
    key: Any  # EllipticCurvePrivateKey
    row: Node
    behaviour: str = "honest"
    on: frozenset[str] = frozenset({"train"})
    online: bool = True
    # (lease, arrays) of every honest reply it made, for checking what was aggregated
    answered: list[tuple[Lease, dict[str, np.ndarray]]] = field(default_factory=list)
    _last_train: RecordDict | None = None

    @property
    def id(self) -> int:
        assert self.row.id is not None
        return self.row.id

    def _honest(self, content: RecordDict, key: Any = None) -> RecordDict:
        settings = WorkerSettings(node_id=self.id, key=key or self.key, device="cpu")
        return do_work(content, settings)

    def answer(self, kind: str, content: RecordDict) -> tuple[RecordDict | None, str | None]:
        """The reply content or error this node sends for ``content``."""
        how = self.behaviour if kind in self.on else "honest"
        if how == "error":
            return None, "ClientApp raised RuntimeError: out of memory"
        if how == "replay" and self._last_train is not None:
            return self._last_train, None
        try:
            reply = self._honest(content, generate_key() if how == "wrong_key" else None)
        except Exception as err:  # as Flower does: a raising ClientApp answers with an error
            return None, f"{type(err).__name__}: {err}"
        update, arrays = parse_reply(reply)
        if how in ("honest", "late", "replay"):
            self.answered.append((update.lease, arrays))
        if kind == "train":
            self._last_train = reply
        if how == "tamper":
            name = sorted(arrays)[0]
            arrays[name] = arrays[name] + np.float32(1e-3)
            return reply_content(update, arrays), None
        if how == "nan":
            name = sorted(arrays)[0]
            arrays[name] = arrays[name].copy()
            arrays[name].reshape(-1)[0] = np.nan
            forged = dataclasses.replace(update, arrays_digest=digest_arrays(arrays), signature=b"")
            return reply_content(sign_update(forged, self.key), arrays), None
        return reply, None


def enroll(ledger: Ledger, specs: Iterable[str | tuple[str, Iterable[str]]],
           institution: str = "University A") -> list[FakeNode]:
    """Enroll one node per spec: a behaviour, or (behaviour, kinds it applies to)."""
    inst = ledger.add_institution(institution)
    assert inst.id is not None
    nodes = []
    for i, spec in enumerate(specs):
        behaviour, on = (spec, ("train",)) if isinstance(spec, str) else spec
        assert behaviour in BEHAVIOURS, behaviour
        key = generate_key()
        pem = public_key_pem(key)
        name = f"node-{chr(ord('a') + i)}-{behaviour}"
        flower_id = 10_000 + i
        row = ledger.add_node(flower_id, name, inst.id, pem, fingerprint(pem))
        nodes.append(FakeNode(name, flower_id, key, row, behaviour, frozenset(on)))
    return nodes


@dataclass(frozen=True)
class Sent:
    msg_id: str
    node: FakeNode
    kind: str
    lease: Lease
    ttl: float


@dataclass
class FakeTransport:
    """``coordinator.transport.Transport`` over ``FakeNode``s, in-process."""

    nodes: list[FakeNode]
    clock: FakeClock
    sent: list[Sent] = field(default_factory=list)
    _pending: dict[str, tuple[Sent, RecordDict]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def _by_fid(self, fid: int) -> FakeNode:
        return next(n for n in self.nodes if n.flower_id == fid)

    def online(self) -> list[int]:
        return sorted(n.flower_id for n in self.nodes if n.online)

    def send(self, dst: int, kind: str, content: RecordDict, ttl: float) -> str:
        node = self._by_fid(dst)
        lease = parse_work(content)[0]
        assert lease.kind == kind
        sent = Sent(f"msg-{next(self._ids)}", node, kind, lease, ttl)
        self.sent.append(sent)
        self._pending[sent.msg_id] = (sent, content)
        return sent.msg_id

    def poll(self, msg_ids: Collection[str]) -> list[Reply]:
        out = []
        for mid in msg_ids:
            if mid not in self._pending:
                continue
            sent, content = self._pending[mid]
            how = sent.node.behaviour if sent.kind in sent.node.on else "honest"
            if how == "silent" or not sent.node.online:
                continue
            if how == "late" and self.clock() <= sent.lease.deadline:
                continue
            del self._pending[mid]
            reply, error = sent.node.answer(sent.kind, content)
            out.append(Reply(mid, sent.node.flower_id, reply, error))
        return out

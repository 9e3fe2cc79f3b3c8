"""An in-process network for driving the real run loop: enrolled fake nodes behind a fake
``Transport``, on a fake clock that only moves when the loop sleeps.

Each node has a behaviour. ``honest`` runs ``node.worker.do_work`` for real; the others are the
ways a node can go wrong that the coordinator must survive::

    honest     do the work, sign it with the node's own key
    bf16       honest, training and evaluating under bf16 autocast as a CUDA node does (CPU bf16)
    wrong_key  do the work, sign it with another key               -> bad_signature
    tamper     change an array after signing                       -> digest_mismatch
    nan        NaN in an array, digest and signature made over it  -> non_finite
    replay     send the previous train reply again                 -> lease_mismatch
    late       do the work, deliver it only after the deadline     -> late
    silent     never answer                                        -> lease expires
    error      answer with an error (as Flower does when the ClientApp raises)

and the well-formed, correctly signed attacks that only the round-level checks
(``coordinator.verify.rules``) can catch::

    sign_flip   the honest update times -10                        -> norm_bound / not_useful
    noise       honest + Gaussian noise of NOISE_SCALE x its RMS     -> norm_bound / not_useful
    free_rider  zero arrays, no training, full tokens claimed      -> not_useful
    copy        another node's update of this round, as its own    -> duplicate
    reuse       its own previous train update, signed for the new lease (honest in its
                first round)                                        -> duplicate
    stale       trains from the base of its previous train lease, claims the current one
                and reports that work's own metrics (honest in its first round)
                                                                    -> base_mismatch
    stale_forged  as stale, but reports the loss the *current* base has on the first batch
                (an attacker who knows the base check; honest in its first round)
                                                                    -> spot checks only
    partial     trains half the lease's steps, claims all of them   -> spot checks only

and two lies about evaluation, well-formed and signed (windows that sum to the total), that
only the coordinator's recomputation of sampled windows or a quorum catches::

    eval_lie     every window a flat, low 0.25 nats per token        -> eval_mismatch
    eval_subtle  every window 3% below the honest loss               -> eval_mismatch

and one about lm-eval tasks (a tasks lease), caught by recomputing sampled documents::

    tasks_lie    every answer's log-likelihood halved (a model that looks
                 twice as sure), the total made to match              -> eval_mismatch

A misbehaviour applies to the message kinds in ``FakeNode.on`` (train only by default, eval
only for the eval lies); for
the other kinds the node is honest, so one node can e.g. train well but go silent in eval.
Replies are made when the loop polls, so they arrive at the earliest on the poll after the send.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

import training.evaluate
import training.model_cache

from coordinator.ledger import Ledger, Node
from coordinator.run.transport import Outgoing, Reply
from node.pause import LeaseGate
from node.worker import WorkerSettings, do_work
from protocol.blobstore import BlobDir
from protocol.compression import Compression, ErrorFeedback, decode, encode
from protocol.digest import arrays_from_bytes, digest_arrays
from protocol.messages import (
    EVAL_WINDOWS, Lease, Update, UpdateMetrics, parse_handback, parse_reply, parse_work,
    reply_content, shard_tokens, work_content,
)
from protocol.signing import fingerprint, generate_key, public_key_pem, sign_update
from training.evaluate import eval_windows
from training.inner import first_batch_loss
from training.families import spec_from_arch

__all__ = ["BEHAVIOURS", "EVAL_LIES", "FakeClock", "FakeNode", "FakeTransport", "Sent", "enroll",
           "work_seconds"]

BEHAVIOURS = ("honest", "bf16", "wrong_key", "tamper", "nan", "replay", "late", "silent", "error",
              "sign_flip", "noise", "free_rider", "copy", "reuse", "stale", "stale_forged",
              "partial", "eval_lie", "eval_subtle", "tasks_lie")
EVAL_LIES = {"eval_lie": 0.25, "eval_subtle": 0.97}  # flat nats per token / factor on the truth
T0 = 1_700_000_000.0
NOISE_SCALE = 20.0


@contextlib.contextmanager
def _cpu_bf16(_device: Any) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield


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


@dataclass(frozen=True)
class _Uploads:
    """In-process, a node's upload lands straight in the coordinator's blob store."""

    blobs: BlobDir | None

    def put(self, digest: str, data: bytes, lease_nonce: str, progress: Any = None) -> None:
        assert self.blobs is not None
        self.blobs.put(data, digest)

    def submit_reply(self, lease_nonce: str, reply: bytes) -> None:
        pass  # the fake transport hands the reply over itself


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
    copy_from: FakeNode | None = None  # "copy": whose update it sends as its own
    attacked: set[str] = field(default_factory=set)  # nonces of the leases it misbehaved on
    seed: int = 0  # "noise": its noise generator's seed
    blobs: BlobDir | None = None  # set by FakeTransport: the coordinator's store
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)  # topk: kept across leases
    upload: bool = True  # honest train payloads go up by digest (False: inline, as attacks do)
    # simulated speed (fleet benchmarks): tokens per fake second; its work then takes fake
    # time, one message after another, and its replies report that time as wall_s.
    # None: instant, reporting the real (tiny) wall time
    speed: float | None = None
    free_at: float = 0.0  # fake time when the work already sent to it is done
    away: tuple[float, float] | None = None  # fake [from, until): the machine is off
    busy_s: float = 0.0  # fake seconds of work done so far
    # its contribution policy and leaving signal (node.pause): honest work it pauses is
    # handed back, as a real node's worker does
    gate: LeaseGate | None = None
    _last_train: RecordDict | None = None
    _last_base: dict[str, np.ndarray] | None = None  # "stale": the base of its last train lease

    def ready(self, kind: str, lease: Lease) -> bool:
        """False while a copier's source has not answered this round's train lease yet."""
        how = self.behaviour if kind in self.on else "honest"
        return how != "copy" or self._copied(lease) is not None

    def _copied(self, lease: Lease) -> dict[str, np.ndarray] | None:
        src = self.copy_from
        if src is None:
            return None
        return next((a for held, a in src.answered
                     if held.kind == "train" and held.round == lease.round), None)

    def _signed(self, update: Update, arrays: dict[str, np.ndarray], **changes: Any) -> RecordDict:
        """``update`` with ``changes``, digested over ``arrays`` and signed with its key."""
        forged = dataclasses.replace(update, arrays_digest=digest_arrays(arrays), signature=b"",
                                     **changes)
        return reply_content(sign_update(forged, self.key), arrays)

    def _parsed(self, reply: RecordDict) -> tuple[Update, dict[str, np.ndarray]]:
        """A reply's update and arrays, an uploaded payload fetched back (as the coordinator
        will: an attacker re-signing honest work re-sends its bytes)."""
        update, arrays = parse_reply(reply)
        if not arrays and update.lease.kind == "train":
            arrays = dict(arrays_from_bytes(self.blobs.get(update.arrays_digest)))
        return update, arrays

    def _codec(self, content: RecordDict) -> tuple[Compression, dict[str, Any]]:
        """The work's update encoding and the base model's shapes (to decode and re-encode:
        an attacker sends a validly encoded update of whatever it made up)."""
        work = parse_work(content)
        model = arrays_from_bytes(self.blobs.get(work.lease.base_digest))
        return work.compression, {k: (a.shape, "<f4") for k, a in model.items()}

    def _attack(self, how: str, content: RecordDict) -> RecordDict | None:
        """The reply of the round-level attacks, or None to go on with the honest work."""
        work = parse_work(content)
        lease, arch, mirrors, codec = work.lease, work.arch, work.mirrors, work.compression
        model = arrays_from_bytes(self.blobs.get(lease.base_digest))
        data = shard_tokens(self.blobs.get(lease.data_digest), lease)
        old_base, self._last_base = self._last_base, model
        tokens = lease.inner_steps * lease.batch_size * lease.seq_len  # the full claim

        def first() -> float:  # the loss the base check wants: one forward pass buys it
            spec = spec_from_arch(arch)
            return first_batch_loss(model, spec, data, batch_size=lease.batch_size,
                                    seq_len=lease.seq_len, seed=lease.seed)

        def claim() -> Update:  # what a node that did not train claims
            loss = first()
            return Update(lease, self.id, "", UpdateMetrics(
                tokens=tokens, steps=lease.inner_steps, loss_before=loss, loss_after=loss - 1.0,
                wall_s=1.0))

        if how == "free_rider":
            return self._signed(claim(), encode({k: np.zeros_like(a) for k, a in model.items()},
                                                codec))
        if how in ("stale", "stale_forged") and old_base is not None:
            # honest work on the right shard, from the model it had before (still a blob)
            old = dataclasses.replace(lease, base_digest=digest_arrays(old_base))
            update, arrays = self._parsed(self._honest(work_content(old, arch, mirrors, codec)))
            if how == "stale_forged":
                update = dataclasses.replace(update, metrics=dataclasses.replace(
                    update.metrics, loss_before=first()))
            return self._signed(update, arrays, lease=lease)
        if how == "partial":  # half the compute, the full claim
            half = dataclasses.replace(lease, inner_steps=max(1, lease.inner_steps // 2))
            update, arrays = self._parsed(self._honest(work_content(half, arch, mirrors, codec)))
            return self._signed(update, arrays, lease=lease, metrics=dataclasses.replace(
                update.metrics, tokens=tokens, steps=lease.inner_steps))
        if how == "reuse" and self._last_train is not None:
            update, arrays = self._parsed(self._last_train)
            return self._signed(update, arrays, lease=lease)
        if how == "copy":
            copied = self._copied(lease)
            assert copied is not None, "poll only asks a copier that is ready"
            return self._signed(claim(), encode(copied, codec))
        return None

    def _eval_lie(self, how: str, update: Update, arrays: dict[str, np.ndarray]) -> RecordDict:
        """A consistent lie: every window changed, the total made to match, signed."""
        honest = arrays[EVAL_WINDOWS]
        if how == "eval_lie":
            n_pred = np.array([e - s - 1 for s, e in eval_windows(
                update.lease.data_end - update.lease.data_start, update.lease.seq_len)])
            lie = EVAL_LIES[how] * n_pred.astype(np.float64)
        else:
            lie = honest * EVAL_LIES[how]
        mean = float(lie.sum()) / update.metrics.tokens
        metrics = dataclasses.replace(update.metrics, loss_before=mean, loss_after=mean)
        return self._signed(update, {EVAL_WINDOWS: lie}, metrics=metrics)

    @property
    def id(self) -> int:
        assert self.row.id is not None
        return self.row.id

    def _honest(self, content: RecordDict, key: Any = None) -> RecordDict:
        # in-process, the coordinator's blob store is the node's cache: always a hit
        settings = WorkerSettings(node_id=self.id, key=key or self.key, device="cpu",
                                  cache=self.blobs, feedback=self.feedback,
                                  uploads=_Uploads(self.blobs) if self.upload else None,
                                  gate=self.gate)
        if self.behaviour != "bf16":
            return do_work(content, settings)
        # what a CUDA node does (bf16 autocast), with CPU bf16 standing in for it
        # (the training step's autocast is model_cache's forward_backward's)
        saved = training.model_cache.autocast, training.evaluate.autocast
        training.model_cache.autocast = training.evaluate.autocast = _cpu_bf16
        try:
            return do_work(content, settings)
        finally:
            training.model_cache.autocast, training.evaluate.autocast = saved

    def answer(self, kind: str, content: RecordDict) -> tuple[RecordDict | None, str | None]:
        """The reply content or error this node sends for ``content``."""
        how = self.behaviour if kind in self.on else "honest"
        reply, error, misbehaved = self._answer(how, kind, content)
        if misbehaved:
            self.attacked.add(parse_work(content).lease.nonce)
        return reply, error

    def _answer(self, how: str, kind: str, content: RecordDict
                ) -> tuple[RecordDict | None, str | None, bool]:
        if how == "error":
            return None, "ClientApp raised RuntimeError: out of memory", True
        if how == "replay" and self._last_train is not None:
            return self._last_train, None, True
        if how in ("free_rider", "stale", "stale_forged", "partial", "reuse", "copy") \
                and kind == "train":
            forged = self._attack(how, content)
            if forged is not None:
                if how != "reuse":  # reuse keeps sending the same old arrays
                    self._last_train = forged
                return forged, None, True
        try:
            reply = self._honest(content, generate_key() if how == "wrong_key" else None)
        except Exception as err:  # as Flower does: a raising ClientApp answers with an error
            return None, f"{type(err).__name__}: {err}", False
        if parse_handback(reply) is not None:  # its policy paused it: nothing to answer
            return reply, None, False
        update, arrays = self._parsed(reply)
        if self.speed is not None:  # report the simulated time, signed as a node would
            reply = self._signed(update, arrays, metrics=dataclasses.replace(
                update.metrics, wall_s=work_seconds(update.lease, self.speed)))
            update, arrays = self._parsed(reply)
        if how in EVAL_LIES and kind == "eval":
            return self._eval_lie(how, update, arrays), None, True
        if how == "tasks_lie" and kind == "tasks":
            lie = {k: a * np.array([0.5, 1.0]) for k, a in arrays.items()}
            loss = -sum(float(a[:, 0].sum()) for a in lie.values()) / update.metrics.tokens
            return self._signed(update, lie, metrics=dataclasses.replace(
                update.metrics, loss_before=loss, loss_after=loss)), None, True
        # train: the pseudo-gradient the coordinator will decode (eval: the windows)
        plain = arrays
        if kind == "train":
            codec, shapes = self._codec(content)
            plain = decode(arrays, codec, shapes, math.inf)
        if how in ("honest", "bf16", "late", "replay"):
            self.answered.append((update.lease, plain))
        if kind == "train":
            self._last_train = reply
        misbehaved = how not in ("honest", "bf16", "replay", "stale", "stale_forged", "partial",
                                 "reuse", "copy", "free_rider")
        if how == "tamper":
            name = sorted(arrays)[0]
            arrays[name] = arrays[name] + np.float32(1e-3)
            return reply_content(update, arrays), None, True
        if kind != "train":
            return reply, None, misbehaved
        if how == "nan":  # (int8 cannot hold a NaN: its scale becomes NaN)
            name = sorted(plain)[0]
            plain[name] = plain[name].copy()
            plain[name].reshape(-1)[0] = np.nan
            return self._signed(update, encode(plain, codec)), None, True
        if how == "sign_flip":
            flipped = {k: a * np.float32(-10) for k, a in plain.items()}
            return self._signed(update, encode(flipped, codec)), None, True
        if how == "noise":
            rng = np.random.default_rng(self.seed + update.lease.round)
            size = sum(a.size for a in plain.values())
            rms = math.sqrt(sum(float(np.square(a, dtype=np.float64).sum())
                                for a in plain.values()) / size)
            return self._signed(update, encode({
                k: a + rng.normal(0.0, NOISE_SCALE * rms, a.shape).astype(np.float32)
                for k, a in plain.items()}, codec)), None, True
        return reply, None, misbehaved


EVAL_COST = 1 / 3  # a token evaluated costs a third of one trained (forward only)


def work_seconds(lease: Lease, speed: float) -> float:
    """Fake seconds a node of ``speed`` trained tokens/s spends on ``lease``."""
    if lease.kind == "train":
        return lease.inner_steps * lease.batch_size * lease.seq_len / speed
    return (lease.data_end - lease.data_start) * EVAL_COST / speed


def enroll(ledger: Ledger, specs: Iterable[str | tuple[str, Iterable[str]]],
           institution: str = "University A", first: int = 0) -> list[FakeNode]:
    """Enroll one node per spec: a behaviour, or (behaviour, kinds it applies to); ``first``
    numbers them on from earlier calls (for nodes of a second institution)."""
    inst = ledger.add_institution(institution)
    assert inst.id is not None
    nodes = []
    for i, spec in enumerate(specs, start=first):
        default_on = (("eval",) if spec in EVAL_LIES else ("tasks",) if spec == "tasks_lie"
                      else ("train",))
        behaviour, on = (spec, default_on) if isinstance(spec, str) else spec
        assert behaviour in BEHAVIOURS, behaviour
        key = generate_key()
        pem = public_key_pem(key)
        name = f"node-{chr(ord('a') + i)}-{behaviour}"
        flower_id = 10_000 + i
        row = ledger.add_node(flower_id, name, inst.id, pem, fingerprint(pem))
        nodes.append(FakeNode(name, flower_id, key, row, behaviour, frozenset(on), seed=i))
    honest = next((n for n in nodes if n.behaviour == "honest"), None)
    for n in nodes:
        if n.behaviour == "copy":
            n.copy_from = honest
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
    """``coordinator.run.transport.Transport`` over ``FakeNode``s, in-process."""

    nodes: list[FakeNode]
    clock: FakeClock
    blobs: BlobDir | None = None  # the coordinator's blob store (the loop's ``blobs``)
    sent: list[Sent] = field(default_factory=list)
    _pending: dict[str, tuple[Sent, RecordDict]] = field(default_factory=dict)
    # msg id -> (fake start, fake time its reply is ready, work seconds)
    _due: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def _by_fid(self, fid: int) -> FakeNode:
        return next(n for n in self.nodes if n.flower_id == fid)

    def _up(self, node: FakeNode) -> bool:
        away = node.away
        return node.online and not (away and away[0] <= self.clock() < away[1])

    def online(self) -> list[int]:
        return sorted(n.flower_id for n in self.nodes if self._up(n))

    def send(self, msgs: Sequence[Outgoing]) -> list[str]:
        return [self._send_one(m.dst, m.kind, m.content, m.ttl) for m in msgs]

    def _send_one(self, dst: int, kind: str, content: RecordDict, ttl: float) -> str:
        node = self._by_fid(dst)
        node.blobs = self.blobs
        lease = parse_work(content).lease
        assert lease.kind == kind
        sent = Sent(f"msg-{next(self._ids)}", node, kind, lease, ttl)
        if node.speed is not None:  # queued behind what the node already holds
            work = work_seconds(lease, node.speed)
            begin = max(self.clock(), node.free_at)
            node.free_at = begin + work
            self._due[sent.msg_id] = (begin, node.free_at, work)
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
            if how == "silent" or not self._up(sent.node):
                continue
            if how == "late" and self.clock() <= sent.lease.deadline:
                continue
            if not sent.node.ready(sent.kind, sent.lease):
                continue
            if mid in self._due:
                begin, due, work = self._due[mid]
                away = sent.node.away
                if away and begin < away[1] and due > away[0]:  # it left mid-work: lost
                    del self._pending[mid]
                    sent.node.free_at = max(sent.node.free_at, away[1])
                    continue
                if self.clock() < due:  # still working on it
                    continue
                sent.node.busy_s += work
            del self._pending[mid]
            reply, error = sent.node.answer(sent.kind, content)
            out.append(Reply(mid, sent.node.flower_id, reply, error))
        return out

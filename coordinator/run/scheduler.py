"""Leases data shards to nodes.

Train shards come from a pool in a seeded shuffled order; when the pool runs dry a new epoch
begins (reshuffled with ``seed + epoch``). A shard whose work was not done (lease expired or
released, or its update rejected) goes back to the *front* of the pool so that it is reissued
next, with the same per-shard seed — to another node than the one that returned it whenever
another is free (a node whose work on a shard was rejected would otherwise get the same shard
back round after round). No train shard is ever out on two ordinary leases at once. A node
works on at most ``depth`` train leases at a time (1 in lock-step rounds; the asynchronous
loop queues more, so the next is on the node before the current one is done) — a lease whose
reply is in and waits for its verdict no longer counts — plus one batch of eval leases per
version, quorum copies included.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from protocol.messages import Kind, Lease

from coordinator.run.sizing import Size, SizingLike, deadline_for, eval_deadline_for, size_lease

__all__ = ["Scheduler", "TrainLike", "shard_seed"]


class TrainLike(SizingLike, Protocol):
    """What the scheduler reads from ``config.TrainParams``."""

    lr: float
    weight_decay: float


def _cuts(n: int, speeds: Sequence[float | None]) -> list[int]:
    """Boundaries splitting ``n`` items over len(speeds) takers in proportion to their speeds
    (all equal when none is known; an unknown one counts as the median of the known)."""
    known = sorted(s for s in speeds if s is not None and s > 0)
    k = len(speeds)
    if not known or not k:  # even, counts differing by at most one
        return [i * n // k for i in range(k + 1)] if k else [0]
    fill = known[len(known) // 2]
    w = [s if s is not None and s > 0 else fill for s in speeds]
    total, acc, out = sum(w), 0.0, [0]
    for x in w:
        acc += x
        out.append(round(n * acc / total))
    return out


def shard_seed(run_id: str, shard_id: int, epoch: int) -> int:
    """The batch-sampling seed of a train shard: the same for every issue of the shard within
    an epoch, so a reissue or a spot check reproduces the same work. Fits in int63."""
    h = hashlib.sha256(f"atom-shard-seed\0{run_id}\0{shard_id}\0{epoch}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@dataclass(frozen=True)
class _Open:
    node_id: int
    lease: Lease
    epoch: int  # -1 for eval leases: nothing to return to the pool
    duplicate: bool  # a spot-check copy: its outcome never touches the pool
    received: bool = False  # its reply is in and awaits the round's verdict: never expires
    allowance: float = 0.0  # seconds from its start to its deadline


class Scheduler:
    """Shard leasing; see the module docstring for the rules.

    Expiry is explicit: the caller runs ``expire()`` (and records what it returns) before
    leasing a round, so a late lease still blocks its shard and its node until then.
    """

    def __init__(self, *, run_id: str, shards: Sequence[tuple[int, int, int]],
                 data_digest: Callable[[int, int], str], train: TrainLike,
                 tokenizer_digest: str, data_manifest: str, seed: int = 0,
                 clock: Callable[[], float] = time.time,
                 nonce: Callable[[], str] = lambda: secrets.token_hex(16)) -> None:
        if not shards:
            raise ValueError("no train shards to schedule")
        self._ranges = {int(sid): (int(start), int(end)) for sid, start, end in shards}
        if len(self._ranges) != len(shards):
            raise ValueError("duplicate shard ids")
        self._run_id, self._train, self._seed = run_id, train, seed
        self._data_digest, self._clock, self._nonce = data_digest, clock, nonce
        # the run's corpus (CorpusInfo.tokenizer_digest / data_manifest): every lease names it
        self._tokenizer_digest, self._data_manifest = tokenizer_digest, data_manifest
        self._digests: dict[tuple[int, int], str] = {}
        self._epoch = -1
        self._pool: deque[tuple[int, int]] = deque()  # (shard_id, epoch), next first
        self._open: dict[str, _Open] = {}  # by nonce, in issue order
        # the same entries by node, and each node's train leases still working: scanning
        # every open lease per query cost ~0.6 ms a call at 1,000 nodes, several calls a
        # pass (bench/scale.py). Written only by _put, _drop and received.
        self._by_node: dict[int, dict[str, _Open]] = {}
        self._working: Counter[int] = Counter()
        self._fresh_out = 0  # of those, the ones that are no spot-check copy
        # the train shards out (a spot-check copy shares its original's) and the open
        # leases' deadlines, soonest first: a scan of every open lease per pass for each
        # was ~2 ms a pass at 1,000 nodes (bench/scale.py). Entries of closed leases stay in
        # the heap until they come up and are skipped.
        self._shards_out: Counter[int] = Counter()
        self._deadlines: list[tuple[float, int, str]] = []
        self._issued = 0  # issue order, for the heap's ties and expire's order
        self._returned_by: dict[int, int] = {}  # shard_id -> the node whose lease returned it

    @property
    def epoch(self) -> int:
        """The epoch whose shuffle the pool is drawing from (-1 before the first lease)."""
        return self._epoch

    # -- leasing ------------------------------------------------------------------------

    def lease_train(self, round: int, node_ids: Sequence[int], base_version: int,
                    base_digest: str, speeds: Mapping[int, float | None] | None = None,
                    depth: int = 1, sizes: Mapping[int, Size] | None = None
                    ) -> dict[int, Lease]:
        """One train lease for each node (taken in id order) working on fewer than ``depth``
        train leases, as long as shards not already out remain; nodes left without one are
        absent from the result. ``speeds`` (tokens/s by node) size each lease to the node
        (``coordinator.run.sizing``); ``sizes`` gives a node's lease its size outright."""
        speeds, sizes = speeds or {}, sizes or {}
        out: dict[int, Lease] = {}
        free = self._free(node_ids, "train", depth=depth)
        # the shards out now, kept up to date here: read per take it made a fan-out to
        # 1,000 nodes quadratic (bench/scale.py)
        out_now = {sid for sid, n in self._shards_out.items() if n > 0}
        # First pass: no node gets back a shard it returned. Second: what is left goes to
        # whoever is still free, so a shard only its returner could take is not held back.
        for strict in (True, False):
            for node in free:
                if node in out:
                    continue
                taken = self._take(out_now, avoid=node if strict else None)
                if taken is None:
                    continue
                shard_id, epoch = taken
                out_now.add(shard_id)
                start, end = self._ranges[shard_id]
                begin = self._start(node)
                lease = self._make(round, shard_id, "train", base_version, base_digest, start,
                                   end, shard_seed(self._run_id, shard_id, epoch), begin=begin,
                                   size=sizes.get(node) or size_lease(self._train,
                                                                      speeds.get(node)))
                self._put(_Open(node, lease, epoch, duplicate=False,
                                allowance=lease.deadline - begin))
                out[node] = lease
        return out

    def lease_duplicate(self, round: int, node_id: int, of: Lease,
                        speed: float | None = None, depth: int = 1) -> Lease:
        """Spot-check hook: lease the same train work as the open lease ``of`` (same shard,
        base and seed) to another node, one working on fewer than ``depth`` train leases.
        The copy's outcome neither consumes nor returns the shard."""
        orig = self._open.get(of.nonce)
        if orig is None or orig.lease != of or of.kind != Kind.TRAIN:
            raise ValueError("can only duplicate an open train lease")
        if node_id == orig.node_id or node_id not in self._free([node_id], "train", depth=depth):
            raise ValueError(f"node {node_id} cannot take a duplicate of this lease")
        allowance = deadline_for(self._train, of.inner_steps, speed)
        lease = replace(of, round=round, nonce=self._nonce(),
                        deadline=self._start(node_id) + allowance)
        self._put(_Open(node_id, lease, orig.epoch, duplicate=True, allowance=allowance))
        return lease

    def lease_eval_copy(self, round: int, node_id: int, of: Lease) -> Lease:
        """Quorum hook: lease the range of the open eval lease ``of`` to another node too,
        which may hold eval leases of its own (it answers them all in one batch)."""
        orig = self._open.get(of.nonce)
        if orig is None or orig.lease != of or of.kind != Kind.EVAL:
            raise ValueError("can only copy an open eval lease")
        held = self.leases_for(node_id)
        # the same range of the same version (the previous version's evaluation of that
        # range may still be queued on the node: another piece of work)
        if node_id == orig.node_id or any(
                x.kind == Kind.EVAL and x.data_start == of.data_start
                and x.base_version == of.base_version for x in held):
            raise ValueError(f"node {node_id} cannot take a copy of this eval lease")
        lease = replace(of, round=round, nonce=self._nonce(),
                        deadline=self._start(node_id) + self._train.deadline_s)
        self._put(_Open(node_id, lease, -1, duplicate=True, allowance=self._train.deadline_s))
        return lease

    def lease_eval(self, round: int, node_ids: Sequence[int], base_version: int,
                   base_digest: str, ranges: Sequence[tuple[int, int]],
                   speeds: Mapping[int, float | None] | None = None) -> dict[int, list[Lease]]:
        """Split the eval ``ranges`` over the nodes (id order) that hold no eval lease on this
        version: each node gets a contiguous run of ``seq_len`` blocks (counts differ by at
        most one; with ``speeds``, in proportion to each node's tokens/s, a node of unknown
        speed counted at the median), as one lease per range it touches, its deadline
        from the node's speed (``sizing.eval_deadline_for``) counted from when what the
        node already holds may be done. Eval shard ids number the pieces of this call
        from 0."""
        blocks = [(s, min(s + self._train.seq_len, end))
                  for start, end in ranges for s in range(start, end, self._train.seq_len)]
        nodes = self._free(node_ids, "eval", base_version)[:len(blocks)]
        cuts = _cuts(len(blocks), [(speeds or {}).get(n) for n in nodes])
        out: dict[int, list[Lease]] = {}
        piece = 0
        for i, node in enumerate(nodes):
            mine = blocks[cuts[i]:cuts[i + 1]]
            spans: list[list[int]] = []
            for s, e in mine:
                if spans and spans[-1][1] == s:
                    spans[-1][1] = e
                else:
                    spans.append([s, e])
            for s, e in spans:
                begin = self._start(node)
                allowed = eval_deadline_for(self._train, e - s, (speeds or {}).get(node))
                lease = self._make(round, piece, "eval", base_version, base_digest, s, e, 0,
                                   begin=begin, size=Size(0, allowed))
                self._put(_Open(node, lease, -1, duplicate=False,
                                allowance=lease.deadline - begin))
                out.setdefault(node, []).append(lease)
                piece += 1
        return out

    def lease_tasks(self, round: int, node_id: int, base_version: int, base_digest: str,
                    bundle_digest: str, n_tasks: int, deadline_s: float) -> Lease:
        """A tasks lease (``protocol.messages``): lm-eval tasks of the bundle
        ``bundle_digest`` on version ``base_version``, queued behind what the node holds.
        Like an evaluation it returns nothing to the pool when it fails."""
        t, begin = self._train, self._start(node_id)
        lease = Lease(run_id=self._run_id, round=round, shard_id=0, kind=Kind.TASKS.value,
                      base_version=base_version, base_digest=base_digest, data_start=0,
                      data_end=n_tasks, data_digest=bundle_digest,
                      tokenizer_digest=self._tokenizer_digest,
                      data_manifest=self._data_manifest, inner_steps=0,
                      batch_size=t.batch_size, seq_len=t.seq_len, lr=0.0, weight_decay=0.0,
                      seed=0, deadline=begin + deadline_s, nonce=self._nonce())
        self._put(_Open(node_id, lease, -1, duplicate=False, allowance=deadline_s))
        return lease

    def restore(self, consumed: Sequence[int]) -> None:
        """Resume after a restart: replay the train shards already accepted (in the order
        they were accepted) so the pool goes on where it stopped, epochs included."""
        for shard_id in consumed:
            if not any(sid == shard_id for sid, _ in self._pool):
                self._new_epoch()
            self._pool.remove(next(e for e in self._pool if e[0] == shard_id))

    # -- outcomes -----------------------------------------------------------------------

    def answered(self, lease: Lease, accepted: bool) -> bool:
        """The lease got a reply. Accepted train work consumes the shard; rejected train work
        puts it back at the pool front. False if the lease was not open (ignored)."""
        entry = self._close(lease)
        if entry is None:
            return False
        if not accepted:
            self._requeue([entry])
        elif not entry.duplicate:
            self._returned_by.pop(lease.shard_id, None)
        return True

    def received(self, lease: Lease) -> bool:
        """A reply to the open ``lease`` arrived and waits for its round's verdict: the lease
        no longer expires, and ``answered`` closes it. False if the lease was not open."""
        entry = self._open.get(lease.nonce)
        if entry is None or entry.lease != lease:
            return False
        if not entry.received:
            self._put(replace(entry, received=True))
            if entry.lease.kind == Kind.TRAIN:
                self._working[entry.node_id] -= 1
                self._fresh_out -= not entry.duplicate
        return True

    def release(self, lease: Lease, *, reason: str) -> bool:
        """The node failed or replied with an error: the shard goes back to the pool front.
        ``reason`` is for the caller's records. False if the lease was not open."""
        entry = self._close(lease)
        if entry is None:
            return False
        self._requeue([entry])
        return True

    def expire(self) -> list[Lease]:
        """Close every lease past its deadline and not ``received``, returning train shards
        to the pool front (first issued first); returns the expired leases."""
        now, late = self._clock(), []
        while self._deadlines and self._deadlines[0][0] < now:
            _, order, nonce = heapq.heappop(self._deadlines)
            if (e := self._open.get(nonce)) is not None and not e.received:
                late.append((order, e))
        late = [e for _, e in sorted(late, key=lambda x: x[0])]
        for e in late:
            self._drop(e.lease.nonce)
        self._requeue(late)
        return [e.lease for e in late]

    # -- queries ------------------------------------------------------------------------

    def outstanding(self) -> list[Lease]:
        """Open leases, in issue order."""
        return [e.lease for e in self._open.values()]

    def data_digest(self, start: int, end: int) -> str:
        """The digest of the shard blob of tokens ``start:end`` (computed once)."""
        if (start, end) not in self._digests:
            self._digests[(start, end)] = self._data_digest(start, end)
        return self._digests[(start, end)]

    def upcoming(self, n: int) -> list[tuple[int, int]]:
        """The token ranges of the next ``n`` shards the pool will lease (of this epoch,
        or the first epoch's before any lease: a later epoch's are the same shards)."""
        if self._pool:
            ids = [sid for sid, _ in itertools.islice(self._pool, n)]
        else:
            ids = self._order(0)[:n] if self._epoch < 0 else []
        return [self._ranges[sid] for sid in ids]

    def leases_for(self, node_id: int) -> list[Lease]:
        """The node's open leases (one, or a batch of eval leases)."""
        return [e.lease for e in self._by_node.get(node_id, {}).values()]

    def holding(self, node_id: int) -> list[Lease]:
        """The node's leases whose reply is not in (train, spot-check copies, evaluations),
        in the order it works through them."""
        return [e.lease for e in self._by_node.get(node_id, {}).values() if not e.received]

    def train_slots(self, node_ids: Sequence[int], depth: int) -> list[int]:
        """The nodes of ``node_ids`` working on fewer than ``depth`` train leases."""
        return self._free(node_ids, "train", depth=depth)

    def train_out(self) -> int:
        """Open train leases whose reply is not in, spot-check copies aside: the work out
        that the remaining steps count (a scan of every lease sent, per lease pass, was
        1.6 s of a 1,000-node run; bench/scale.py)."""
        return self._fresh_out

    def lease_for(self, node_id: int) -> Lease | None:
        """The node's open lease (the first, for an eval batch), or None."""
        return next(iter(self.leases_for(node_id)), None)

    def node_of(self, lease: Lease) -> int | None:
        """The node an open lease was issued to."""
        entry = self._open.get(lease.nonce)
        return entry.node_id if entry is not None and entry.lease == lease else None

    # -- internals ----------------------------------------------------------------------

    def _free(self, node_ids: Sequence[int], kind: str, version: int | None = None,
              depth: int = 1) -> list[int]:
        """The nodes holding fewer than ``depth`` open leases of ``kind`` (on base
        ``version``, if given; train leases whose reply is in do not count). A node may
        hold train leases and evaluations queued behind them: its SuperNode takes the next
        the moment it replies."""
        if kind == Kind.TRAIN and version is None:
            return sorted(n for n in set(node_ids) if self._working[n] < depth)
        return sorted(n for n in set(node_ids) if sum(
            1 for e in self._by_node.get(n, {}).values()
            if e.lease.kind == kind and (version is None or e.lease.base_version == version)
            and not (kind == Kind.TRAIN and e.received)) < depth)

    def _start(self, node_id: int) -> float:
        """When a new lease for ``node_id`` may start, for its deadline: now plus the time
        allowed for what the node still holds (a queued lease's deadline counts from when
        the work ahead of it may be done, not from its issue). From now, not from the
        deadlines ahead: those count from their own start, and a node that always holds
        the next lease would push every new deadline further out than the last."""
        return self._clock() + sum(e.allowance for e in self._by_node.get(node_id, {}).values()
                                   if not e.received)

    def _take(self, out: set[int], avoid: int | None = None) -> tuple[int, int] | None:
        """The first pooled shard that is not ``out`` on a lease (nor returned by node
        ``avoid``); a new epoch when the pool is empty. None when no pooled shard fits."""
        if not self._pool:
            self._new_epoch()
        for i, (shard_id, epoch) in enumerate(self._pool):
            if shard_id not in out and (avoid is None
                                        or self._returned_by.get(shard_id) != avoid):
                del self._pool[i]
                return shard_id, epoch
        return None

    def _new_epoch(self) -> None:
        self._epoch += 1
        self._pool.extend((sid, self._epoch) for sid in self._order(self._epoch))

    def _order(self, epoch: int) -> list[int]:
        """The shard ids in the order ``epoch`` leases them."""
        order = np.random.default_rng(self._seed + epoch).permutation(sorted(self._ranges))
        return [int(sid) for sid in order]

    def _close(self, lease: Lease) -> _Open | None:
        entry = self._open.get(lease.nonce)
        if entry is None or entry.lease != lease:
            return None
        self._drop(lease.nonce)
        return entry

    def _put(self, entry: _Open) -> None:
        """Add (or replace) an open lease; a new train lease counts as working."""
        nonce = entry.lease.nonce
        if nonce not in self._open:
            if entry.lease.kind == Kind.TRAIN:
                self._shards_out[entry.lease.shard_id] += 1
                if not entry.received:
                    self._working[entry.node_id] += 1
                    self._fresh_out += not entry.duplicate
            self._issued += 1
            heapq.heappush(self._deadlines, (entry.lease.deadline, self._issued, nonce))
        self._open[nonce] = entry
        self._by_node.setdefault(entry.node_id, {})[nonce] = entry

    def _drop(self, nonce: str) -> None:
        entry = self._open.pop(nonce)
        if entry.lease.kind == Kind.TRAIN:
            if (left := self._shards_out[entry.lease.shard_id] - 1) > 0:
                self._shards_out[entry.lease.shard_id] = left
            else:
                del self._shards_out[entry.lease.shard_id]
            if not entry.received:
                self._working[entry.node_id] -= 1
                self._fresh_out -= not entry.duplicate
        mine = self._by_node[entry.node_id]
        del mine[nonce]
        if not mine:
            del self._by_node[entry.node_id]

    def _requeue(self, entries: Sequence[_Open]) -> None:
        back = [e for e in entries if e.lease.kind == Kind.TRAIN and not e.duplicate]
        for e in back:
            self._returned_by[e.lease.shard_id] = e.node_id
        self._pool.extendleft(reversed([(e.lease.shard_id, e.epoch) for e in back]))

    def _make(self, round: int, shard_id: int, kind: str, base_version: int, base_digest: str,
              start: int, end: int, seed: int, *, begin: float | None = None,
              size: Size | None = None) -> Lease:
        t, train = self._train, kind == Kind.TRAIN
        size = size or Size(t.inner_steps, t.deadline_s)
        return Lease(run_id=self._run_id, round=round, shard_id=shard_id, kind=kind,
                     base_version=base_version, base_digest=base_digest,
                     data_start=start, data_end=end, data_digest=self.data_digest(start, end),
                     tokenizer_digest=self._tokenizer_digest, data_manifest=self._data_manifest,
                     inner_steps=size.inner_steps if train else 0, batch_size=t.batch_size,
                     seq_len=t.seq_len, lr=float(t.lr) if train else 0.0,
                     weight_decay=float(t.weight_decay) if train else 0.0, seed=seed,
                     deadline=(self._clock() if begin is None else begin) + size.deadline_s,
                     nonce=self._nonce())

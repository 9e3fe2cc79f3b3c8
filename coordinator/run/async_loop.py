"""The asynchronous run loop: no round barrier; an outer step whenever enough work is in.

Every eligible node works on up to ``1 + [async] queue`` train leases at once, each built on
the version current when it was issued and sized to the node as in lock-step rounds (the
queued one's blobs are fetched while the node trains, so it never waits for work). A reply is
screened as it arrives — ``verify.reply.verify`` takes a base up to ``max_staleness`` versions
behind — and its own checks (base check, usefulness scores) run at once against its own base
version, which the model store keeps; it then waits in the buffer. Once ``buffer`` (K)
updates are in, or the oldest has waited ``max_wait_s``, the buffer is judged together by the
round rules (each update against its own base) and what stands is aggregated into the next
version through the outer Nesterov step: each update rebased onto the current version
(``_step_arrays``) and weighted by ``coordinator.run.staleness`` (tokens x trust x
(1 + tau) ** -power). The verdicts, credits, receipts and
the version commit together, as a lock-step round's do.

A spot check copies a lease to another node when one has a free slot (the worker's chance as
in lock-step: ``verify.trust.spot_check_rate``); the first of the two results to arrive waits
for the other, so the pair is judged in one step. Every ``eval_every``-th version (and the
last) is evaluated by eval leases queued behind the nodes' train leases and judged when its
last reply is in, as in lock-step: evaluation never stops training.

Leases are issued only while the work out and buffered falls short of what the remaining
steps need (K per step), so the last step waits for every train lease still out and the run
ends with nothing in flight. While it waits, a node with nothing left to do would idle until
the slowest lease is in: with ``[async] fill`` it gets one more lease sized to end when the
others are predicted to (``_fill``), and that update joins the last step. After a crash the
open leases are closed as expired (their shards go back to the pool) and the buffer is
empty: nothing in it had been recorded, so nothing accepted is lost, and its work is done
again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from protocol.errors import Reason
from protocol.messages import Kind, Lease

from coordinator.ledger import Node
from coordinator.run.batches import Sent, TrainBatch
from coordinator.run.loop import Outbox, RunLoop
from coordinator.run.fill import NodeWork, fill_sizes
from coordinator.verify.round_judge import Candidate
from coordinator.verify.trust import (
    NEW_NODE_TRUST, pick_checker, spot_check_rate,
)

__all__ = ["AsyncRunLoop", "make_run_loop"]

log = logging.getLogger(__name__)

# between passes: replies that land while the loop sleeps are screened and leased together,
# the last one waiting for all the others (0.2 s made passes of ~4 replies at 1,000 nodes
# and most of the lease p50; bench/scale.py); a pull per pass is one small request
_IDLE_S = 0.05
_LOOK_S = 1.0  # how often the loop reads who is online (each read touches every node's row)
# seconds of replies' own checks per pass, between taking replies and leasing: what a node
# that just answered may wait for its next lease beyond the pass itself
_PREPARE_S = 0.02
# how long the nodes' trust and probation may be reused between outer steps (each read is a
# query for the verdicts since the last; those that move them are made mostly at steps)
_STANDING_S = 10.0
# The nodes whose replies a poll brought get their next leases before the replies are
# screened (``AsyncRunLoop._answered``), except when the replies may complete an outer step
# that should take less than this: then they wait for it, so that their next leases are
# built on the new version. A step at 1,000 nodes takes ~0.6 s (verdicts, receipts,
# aggregation): waiting through it was most of the lease p99 (bench/scale.py), so then they
# are leased first, on the version the step supersedes: one version staler, which costs a
# small fleet (where each node is a third of a step) more than a large one (a tenth of a
# percent of it per node). A step's time is predicted from its size: the last step's
# seconds per update, ~0.5 ms before any (SQLite, this 2-core machine).
_HOLD_S = 0.05
_STEP_S_PER_UPDATE = 5e-4


def make_run_loop(cfg, *args, **kwargs) -> RunLoop:  # type: ignore[no-untyped-def]
    """The run loop ``cfg`` asks for: asynchronous with ``[async] enabled``, else lock-step."""
    return (AsyncRunLoop if cfg.asynchronous.enabled else RunLoop)(cfg, *args, **kwargs)


@dataclass
class AsyncRunLoop(RunLoop):
    # screened train replies waiting for an outer step (one batch object for all of them)
    _buffer: TrainBatch = field(default_factory=lambda: TrainBatch("train", -1))
    _copies: set[str] = field(default_factory=set)  # nonces of spot-check copies
    _wanted: dict[str, Lease] = field(default_factory=dict)  # originals waiting for a checker
    _since: float | None = None  # when the oldest buffered reply arrived
    _standing: tuple[float, dict[int, float], set[int]] | None = None  # (read at, trust, probation)
    _step_s_per_update: float = _STEP_S_PER_UPDATE  # the last step's, on the loop's clock
    _nodes: list[Node] = field(default_factory=list)  # eligible, as the roster last said
    _ids: tuple[list[Node] | None, list[int]] = (None, [])  # their ids
    _inst: tuple[list[int] | None, dict[int, int]] = (None, {})  # their institutions
    # when each node began the work it holds (loop clock): its last reply, or the send to it
    # while it held nothing; what ``_fill`` predicts its end from
    _began: dict[int, float] = field(default_factory=dict)

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        self._resume()
        steps = self.cfg.run.rounds
        if self.store.version >= steps and self.store.version in self._evaluated:
            log.info("all %d outer steps already done", steps)
            return
        self._wait_for_nodes()
        self._evaluate_if_due()
        self._nodes, looked = self.roster.eligible(), self.clock()
        while self.store.version < steps:
            self._pump()  # (the nodes that answered get their next leases in it)
            # the replies' own checks: one before the step (which takes only checked
            # replies), more after the leases
            self._prepare(0.0)
            if self.clock() - looked >= _LOOK_S:
                self._nodes, looked = self.roster.eligible(), self.clock()
            taking = self._step_due(len(self._nodes))
            if self._lease_first(taking):
                self._nodes = self._lease(self._nodes, stepping=taking)
            if taking is not None:
                t = self.clock()
                self._step()
                self._step_s_per_update = (self.clock() - t) / max(1, taking)
                self._evaluate_if_due()
            self._nodes = self._lease(self._nodes)
            if not self._prepare(_PREPARE_S):  # checks left: straight back to the replies
                self._publish_ahead()
                self.sleep(_IDLE_S)
        self._finish_evals()
        self.ledger.add_event("run", f"run {self.cfg.run.id} finished at version "
                                     f"{self.store.version}")

    def _resume(self) -> int:
        """Close the leases a stopped coordinator left open (their shards go back to the
        pool) and score the versions made before the stop that were due an evaluation."""
        self._recover(self.ledger.leases(status="issued"), due=self._eval_due)
        return self.store.version + 1

    def _eval_due(self, version: int) -> bool:
        every = self.cfg.asynchronous.eval_every
        return version % every == 0 or version >= self.cfg.run.rounds

    def _evaluate_if_due(self) -> None:
        version = self.store.version
        if version in self._evaluated or not self._eval_due(version):
            return
        self._evaluated.add(version)
        work: Outbox = {}
        made_in = self.ledger.latest_version()
        self._eval_leases(made_in.round if made_in is not None else version, work)
        self._send(work)

    # -- outer steps --------------------------------------------------------------------

    def _k(self, online: int) -> int:
        """Updates per outer step: ``[async] buffer``, or the nodes online."""
        return self.cfg.asynchronous.buffer or max(1, online)

    def _open_train(self) -> list[Sent]:
        """Train leases sent and not answered (spot-check copies included)."""
        return [s for s in self._pending.values() if s.lease.kind == Kind.TRAIN]

    def _ready(self) -> tuple[list, list[Lease]]:
        """The buffered replies an outer step may judge now: all but a spot check's first
        result while its partner is still out, and those whose own checks have not run yet
        (a step that ran them would keep every node that answers meanwhile waiting for its
        next lease; they join the next step)."""
        unchecked = set(self._unprepared)  # ids of the candidates
        out = {s.lease.nonce for s in self._open_train()} | {
            c.lease.nonce for c in self._buffer.cands if id(c) in unchecked}
        held = out | {n for o, c in self._buffer.pairs if o.nonce in out or c.nonce in out
                      for n in (o.nonce, c.nonce)}
        return ([c for c in self._buffer.cands if c.lease.nonce not in held],
                [x for x in self._buffer.screened_out if x.nonce not in held])

    def _step_due(self, online: int) -> int | None:
        """None if no outer step is due, else how many fresh updates (no spot-check copies)
        it takes: the leases sent before it count them as done."""
        buf = self._buffer
        if not buf.cands and not buf.screened_out:
            return None
        if self.store.version == self.cfg.run.rounds - 1:  # the last: all work in
            if self.scheduler.train_out():  # asked every pass: the rest scans every lease out
                return None
            cands, _ = self._ready()
            if not cands and not buf.screened_out:
                return None
            out = {s.lease.nonce for s in self._pending.values()}
            if self._open_train() or set(self._wanted) & out:
                return None
            return sum(1 for c in cands if c.lease.nonce not in self._copies)
        waited = self._waited()
        if len(buf.cands) < self._k(online) and not waited:
            return None  # asked every pass: what follows scans every lease out (~1 ms)
        # K counts every fresh update in, a spot-checked one waiting for its partner too:
        # the step takes what is ready and the waiting one joins the next (the step does
        # not stall for a copy that the checker starts only after its own lease)
        unchecked, copies = self._unprepared, self._copies  # (ids of the candidates)
        fresh = sum(1 for c in buf.cands if c.lease.nonce not in copies and id(c) not in unchecked)
        if fresh < self._k(online) and not waited:
            return None
        cands, _ = self._ready()  # (a scan of every lease out: after the counts)
        if not cands:
            return None
        return sum(1 for c in cands if c.lease.nonce not in self._copies)

    def _lease_first(self, taking: int | None) -> bool:
        """Whether the pass's nodes are leased before the step due (of ``taking`` updates):
        when it should take longer than ``_HOLD_S``."""
        return taking is not None and taking * self._step_s_per_update > _HOLD_S

    def _step(self) -> None:
        """Judge what is ready in the buffer and make the next version from what stands."""
        if self.store.version == self.cfg.run.rounds - 1:
            self._prepare(math.inf)  # the last step takes everything, checked
        cands, screened_out = self._ready()
        taken = {c.lease.nonce for c in cands} | {x.nonce for x in screened_out}
        buf = self._buffer
        batch = TrainBatch("train", self.store.version, cands=cands, screened_out=screened_out,
                           pairs=[p for p in buf.pairs
                                  if p[0].nonce in taken or p[1].nonce in taken],
                           trust=self._trust(fresh=True)[0])
        buf.cands = [c for c in buf.cands if c.lease.nonce not in taken]
        buf.screened_out = [x for x in buf.screened_out if x.nonce not in taken]
        buf.pairs = [p for p in buf.pairs if p not in batch.pairs]
        self._copies -= {c.nonce for _, c in batch.pairs}
        self._since = min((c.received_at for c in buf.cands), default=None)
        limit = self.cfg.asynchronous.max_staleness
        for c in batch.cands:  # one that waited for its partner may have fallen behind
            behind = self.store.version - c.lease.base_version
            if behind > limit:
                c.reject(Reason.STALE_BASE, f"built on version {c.lease.base_version}, "
                         f"coordinator is at {self.store.version} (at most {limit} behind)")
        self._close_train(self.store.version + 1, batch)
        # verdicts moved trust: read it now, in the step, not in the next lease pass (that
        # pass leases every node that answered during the step, and they all waited for the
        # read: most of the PostgreSQL lease p99 at 1,000 nodes, bench/scale.py)
        self._trust(fresh=True)

    def _trust(self, fresh: bool = False) -> tuple[dict[int, float], set[int]]:
        """The nodes' trust and those on probation (``coordinator.run.standing``), brought
        up to date after an outer step, once ``_STANDING_S`` old, or when ``fresh``: read for
        every lease they were a third of the coordinator's time at 200 nodes
        (bench/scale.py)."""
        now = self.clock()
        if fresh or self._standing is None or now - self._standing[0] >= _STANDING_S:
            self.standing.refresh()
            self._standing = (now, self.standing.trust(), self.standing.probation())
        return self._standing[1], self._standing[2]

    def _step_arrays(self, c: Candidate) -> dict[str, np.ndarray]:
        """An update tau versions behind, as a pseudo-gradient from the current version to
        the node's local model: ``current - (base - update)``. Applied as it came
        (``base - local``) it would redo the progress the versions since its base already
        made; as a point it is averaged like fresh work (tau = 0: unchanged)."""
        if c.lease.base_version == self.store.version:
            return c.arrays
        base, now = self.store.base(c.lease.base_version), self.store.arrays
        return {k: (now[k] - base[k]).astype(np.float32) + c.arrays[k] for k in c.arrays}

    # -- leasing ------------------------------------------------------------------------

    def _lease(self, nodes: list[Node], stepping: int | None = None,
               unscreened: int = 0) -> list[Node]:
        """Give every eligible node with a free slot work: first a spot check waiting for a
        checker, then new shards while the remaining steps still need work (with an outer
        step about to take ``stepping`` fresh updates, as the work after it; with
        ``unscreened`` fresh replies in that count as updates in). Returns the eligible
        nodes, checked afresh when there was work to give (a node revoked or benched a
        moment ago gets none)."""
        depth = 1 + self.cfg.asynchronous.queue
        if self._ids[0] is not nodes:  # 1,000 ORM attribute reads a pass (bench/scale.py)
            self._ids = (nodes, [n.id for n in nodes])
        ids = self._ids[1]
        if not self.scheduler.train_slots(ids, depth):
            return nodes
        # the fresh updates buffered and the train leases out, spot-check copies aside
        # (counted by the scheduler: a lease sent is open there until its reply is in)
        fresh = self._fresh() + unscreened
        out = self.scheduler.train_out()
        steps_left = self.cfg.run.rounds - self.store.version - (stepping is not None)
        taken = stepping or 0

        def need() -> int:
            return steps_left * self._k(len(nodes)) - (fresh - taken) - out

        if need() <= 0 and not self._wanted:
            return self._fill(nodes, depth)
        if (still := self.roster.still_eligible(nodes, self.roster.revoked(self._passes))) \
                is not nodes:
            nodes, ids = still, [n.id for n in still]
        work: Outbox = {}
        rnd = self.store.version + 1
        trust, probation = self._trust()
        speeds = self.roster.speeds(ids)
        rate, left = self.cfg.verify.spot_check_rate, need()
        while True:
            # checks first: a copy takes a slot before the next shard does
            self._check(ids, depth, trust, probation, speeds, work)
            free = self.scheduler.train_slots(ids, depth)[:max(0, left)]
            if not free:
                break
            leases = self.scheduler.lease_train(rnd, free, self.store.version, self.store.digest,
                                                speeds, depth=depth)
            if not leases:
                break
            for n, lease in leases.items():
                work.setdefault(n, []).append((lease, self._buffer))
                if self.rng.random() < spot_check_rate(rate, trust.get(n, NEW_NODE_TRUST),
                                                       n in probation):
                    self._wanted[lease.nonce] = lease
            left -= len(leases)
        self._send(work)
        return nodes

    def _fill(self, nodes: list[Node], depth: int) -> list[Node]:
        """At the last step, with all the work it needs out: a lease for each eligible node
        with a free slot, sized to end with the work still out (``coordinator.run.fill``).
        Not for a node on probation, and not spot-checked: a copy would need another
        node's time past the end. Returns the eligible nodes, checked afresh."""
        if not self.cfg.asynchronous.fill or self.store.version != self.cfg.run.rounds - 1:
            return nodes
        nodes = self.roster.still_eligible(nodes, self.roster.revoked(self._passes))
        _, probation = self._trust()
        free = [n for n in self.scheduler.train_slots([n.id for n in nodes], depth)
                if n not in probation]
        if not free:
            return nodes
        held = {n: h for n in {*self._began, *free} if (h := self.scheduler.holding(n))}
        speeds = self.roster.measured_speeds(set(held) | set(free))
        now = self.clock()

        def work(n: int) -> NodeWork:
            return self._began.get(n, now), held.get(n, []), speeds.get(n)

        sizes = fill_sizes(self.cfg.train, now, {n: work(n) for n in held},
                           {n: work(n) for n in free})
        if not sizes:
            return nodes
        leases = self.scheduler.lease_train(self.store.version + 1, sorted(sizes),
                                            self.store.version, self.store.digest,
                                            depth=depth, sizes=sizes)
        for n, lease in leases.items():
            log.info("fill: %s gets %d inner steps to end with the last step's work",
                     self.roster.rows[n].name, lease.inner_steps)
        self._send({n: [(lease, self._buffer)] for n, lease in leases.items()})
        return nodes

    def _send(self, work: Outbox) -> None:
        """Send as the run loop does, noting when each node that held nothing begins."""
        now = self.clock()
        for n, sends in work.items():
            new = {lease.nonce for lease, _ in sends}
            if all(x.nonce in new for x in self.scheduler.holding(n)):
                self._began[n] = now
        super()._send(work)

    def _fresh(self) -> int:
        """The fresh updates buffered (spot-check copies aside)."""
        copies, cands = self._copies, self._buffer.cands
        return len(cands) - (sum(1 for c in cands if c.lease.nonce in copies) if copies else 0)

    def _answered(self, sents: list[Sent]) -> None:
        """The nodes whose replies a poll brought get their next work now, before the
        replies are screened (~1.4 ms each at 1,000 nodes, a third of it the signature):
        a node waits for the leases before its own, not for the checks of every reply
        that came with it. An unscreened reply counts as a fresh update; one rejected is
        leased again once its verdict is in, and a node that sent garbage gets one more
        lease, as with ``[async] queue`` it holds one already. Not when the replies may
        complete an outer step predicted quick (``_HOLD_S``): then they are screened, the
        step is made and the nodes build on the new version."""
        now = self.clock()
        for s in sents:  # each is on to its next work now (or idle)
            self._began[s.node.id] = now
        if self.store.version >= self.cfg.run.rounds or \
                not any(s.lease.kind == Kind.TRAIN for s in sents):
            return  # the run is done, or an evaluation freed no train slot
        new = sum(1 for s in sents
                  if s.lease.kind == Kind.TRAIN and s.lease.nonce not in self._copies)
        if self._may_step(new) and not self._lease_first(self._fresh() + new):
            return
        self._nodes = self._lease(self._nodes, unscreened=new)

    def _may_step(self, new: int) -> bool:
        """Whether ``new`` more fresh updates could make an outer step due in this pass."""
        if self.store.version == self.cfg.run.rounds - 1:
            return True
        return self._fresh() + new >= self._k(len(self._nodes)) or self._waited()

    def _waited(self) -> bool:
        """Whether the oldest buffered reply has waited ``[async] max_wait_s``."""
        return self._since is not None and \
            self.clock() - self._since >= self.cfg.asynchronous.max_wait_s

    def _check(self, ids: list[int], depth: int, trust: dict[int, float],
               probation: set[int], speeds: dict, work: Outbox) -> None:
        """Copy each lease waiting for a spot check to a node with a free slot (trust-
        weighted, another institution's where one is free); a lease whose reply came in
        first goes unchecked (its result is not held back for a copy not yet begun)."""
        if not self._wanted:
            return
        live = {s.lease.nonce for s in self._pending.values()} | {
            lease.nonce for sends in work.values() for lease, _ in sends}
        if self._inst[0] is not ids:  # read once per list: a pass with copies asked them all
            rows = self.roster.rows
            self._inst = (ids, {i: rows[i].institution_id for i in ids if i in rows})
        inst = self._inst[1]
        for nonce, orig in list(self._wanted.items()):
            worker = self.scheduler.node_of(orig)
            if nonce not in live or worker is None:
                del self._wanted[nonce]
                continue
            free = [n for n in self.scheduler.train_slots(ids, depth) if n != worker]
            checker = pick_checker(worker, free, trust, self.rng, inst, probation)
            if checker is None:
                continue
            copy = self.scheduler.lease_duplicate(orig.round, checker, orig, speeds.get(checker),
                                                  depth=depth)
            del self._wanted[nonce]
            self._copies.add(copy.nonce)
            self._buffer.pairs.append((orig, copy))
            work.setdefault(checker, []).append((copy, self._buffer))

    # -- replies ------------------------------------------------------------------------

    def _expected_base(self, sent: Sent) -> tuple[int, int]:
        """Train work may be built on any of the last ``max_staleness`` versions; an
        evaluation is of its own version."""
        if sent.lease.kind == Kind.TRAIN:
            return self.store.version, self.cfg.asynchronous.max_staleness
        return sent.batch.version, 0

    def _pump(self) -> None:
        before = len(self._buffer.cands)
        super()._pump()
        if len(self._buffer.cands) > before and self._since is None:
            self._since = self.clock()

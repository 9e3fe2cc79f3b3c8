"""The run loop: lease shards to online nodes, judge what comes back, make model versions.

One round leases, on the current version v, each eligible node one distinct train shard
(spot checkers train another node's shard again) and, queued behind it on the same nodes,
v's evaluation if it has none yet (the validation slice split over the nodes, some pieces
also leased to a second node for a quorum). Every reply is screened by
``verify.reply.verify`` as it arrives. Once all train replies are in, ``verify.round_judge``
judges them together and the accepted pseudo-gradients are aggregated and applied with the
outer optimizer into v + 1.
The evaluation is judged when its last reply is in — usually while the nodes already train
v + 1 (``eval_judge`` recomputes a sample of every reply's windows; v's validation loss sums
the accepted replies, and any part no accepted reply covers is evaluated here, so every
version gets a validation loss that was checked).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict

from protocol.blobstore import BlobDir
from protocol.digest import arrays_to_bytes
from protocol.errors import ProtocolError
from protocol.messages import Kind, Lease, parse_handback, work_content
from training.corpus import CorpusInfo
from training.families import arch_of
from training.shards import data_digest, make_shards, shard_bytes

from coordinator import metrics
from coordinator.accounting.credits import ReceiptIssuer
from coordinator.aggregators import get_aggregator
from coordinator.config import RunConfig
from coordinator.ledger import LeaseRow, Ledger
from coordinator.run.batches import Batch, EvalBatch, Sent, TaskBatch, TrainBatch
from coordinator.run.eval_rounds import EvalRounds
from coordinator.run.reply_checks import ReplyChecks
from coordinator.run.model_store import ModelStore
from coordinator.run.roster import Roster
from coordinator.run.scheduler import Scheduler
from coordinator.run.standing import Standing
from coordinator.run.task_evals import TaskEvals
from coordinator.run.staleness import update_weight
from coordinator.run.transport import Outgoing, Transport
from coordinator.verify.checker import Checker
from coordinator.verify.eval_judge import EvalJudge
from coordinator.verify.record import record_judged, screen_reply
from coordinator.verify.round_judge import Candidate, RoundJudge
from coordinator.verify.scoring import CheckJob
from coordinator.verify.trust import NEW_NODE_TRUST, plan_spot_checks

__all__ = ["RunLoop"]

log = logging.getLogger(__name__)

# per node (ledger id), the leases to send it in order, each with the batch it answers to
Outbox = dict[int, list[tuple[Lease, Batch]]]

# between passes while a round waits for replies (they come by the reply spool, a directory
# read: at 0.2 s the round's last reply waited ~0.1 s on average for the loop to look)
_POLL_S = 0.05
_TTL_SLACK_S = 600.0
_AHEAD = 8  # shard blobs an idle pass writes for the leases to come
# a node that handed a lease back sits out what it asked, within these bounds (a node's policy
# may change when it restarts: it is asked again at least hourly)
_HANDBACK_S = (10.0, 3600.0)


def _blobs_of(lease: Lease) -> tuple[str, ...]:
    """The blobs a node fetches for ``lease``: its base and data (a tasks lease's data is
    the task bundle, and it reads the run's tokenizer too)."""
    if lease.kind == Kind.TASKS:
        return lease.base_digest, lease.data_digest, lease.tokenizer_digest
    return lease.base_digest, lease.data_digest


@dataclass
class RunLoop(EvalRounds, ReplyChecks):
    cfg: RunConfig
    ledger: Ledger
    transport: Transport
    store: ModelStore
    corpus: CorpusInfo
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    issuer: ReceiptIssuer | None = None  # signs credit receipts; the ServerApp passes one
    # what nodes fetch by digest (model versions, shards); default: beside the checkpoints
    blobs: BlobDir | None = None
    # spot checks and held-out batches: unpredictable to nodes (tests pass a seeded Random)
    rng: random.Random = field(default_factory=random.SystemRandom)
    _pending: dict[str, Sent] = field(default_factory=dict)  # by Flower message id
    _evals: list[EvalBatch] = field(default_factory=list)  # evaluations still open
    _evaluated: set[int] = field(default_factory=set)  # versions whose evaluation was sent
    # version digest -> (previous version's digest, the change's blob): Work.delta
    _deltas: dict[str, tuple[str, str]] = field(default_factory=dict)
    # screened train replies whose own checks (RoundJudge.plan) have not come back yet,
    # in arrival order, by id(candidate)
    _unprepared: dict[int, Candidate] = field(default_factory=dict)
    # the checks out at the checker processes, by job id
    _checking: dict[int, tuple[Candidate, CheckJob]] = field(default_factory=dict)
    _warming: dict[int, CheckJob] = field(default_factory=dict)  # checker jobs of issued leases
    _passes: int = 0  # polls so far
    _published: set[tuple[int, int]] = field(default_factory=set)  # shard blobs written

    def __post_init__(self) -> None:
        self.roster = Roster(self.ledger, self.transport, self.clock,
                             self.cfg.train.target_lease_s)
        self.tokens = self.corpus.tokens()
        if self.blobs is None:
            self.blobs = BlobDir(self.store.dir.parent / "blobs")
        lo, hi = self.corpus.train_range
        shards = [(s.shard_id, s.start, s.end) for s in make_shards(lo, hi, self.cfg.shard_tokens)]
        self.scheduler = Scheduler(run_id=self.cfg.run.id, shards=shards, train=self.cfg.train,
                                   data_digest=lambda a, b: data_digest(self.tokens[a:b],
                                                                     self.corpus.dtype),
                                   tokenizer_digest=self.corpus.tokenizer_digest,
                                   data_manifest=self.corpus.data_manifest,
                                   clock=self.clock)
        # a spot-checked shard may have two accepted results in its round: it counts once
        done = {(rnd, shard): shard for rnd, shard in self.ledger.accepted_train_shards()}
        self.scheduler.restore(list(done.values()))
        self.aggregator = get_aggregator(self.cfg.aggregation.method,
                                         dataclasses.asdict(self.cfg.aggregation))
        self.arch = arch_of(self.store.spec)  # what every work message carries
        self.codec = self.cfg.codec()
        self.standing = Standing(self.ledger)  # trust and probation, read incrementally
        self.judge = RoundJudge(self.cfg, self.ledger, self.store.spec, self.tokens,
                                self.corpus.val_range, self.rng, self.issuer)
        self._evaluated = {v.version for v in self.ledger.versions() if v.val_loss is not None}
        self.eval_judge = EvalJudge(self.cfg, self.ledger, self.store.spec, self.tokens,
                                    self.rng, self.issuer)
        self.task_evals = TaskEvals.open(self.cfg, self.ledger, self.scheduler, self.corpus,
                                         self.blobs, self.arch, self.store.spec.block_size,
                                         self.rng, self.issuer)
        v = self.cfg.verify
        checks = v.usefulness_tokens > 0 or v.base_loss_tolerance > 0
        self.checker = Checker(self.store.spec, self.corpus, self.blobs.root,
                               seq_len=self.cfg.train.seq_len,
                               batch_size=self.cfg.train.batch_size,
                               processes=v.check_processes, compression=self.codec) \
            if checks and v.check_processes > 0 else None

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the checker processes (the loop runs any checks still to do itself) and the
        task judge's thread."""
        if self.checker is not None:
            self.checker.close()
            self.checker = None
        if self.task_evals is not None:
            self.task_evals.close()

    def _run(self) -> None:
        first = self._resume()
        latest = self.ledger.latest_version()
        unevaluated = latest is not None and latest.val_loss is None
        if first > self.cfg.run.rounds and not unevaluated:
            log.info("all %d rounds already done", self.cfg.run.rounds)
            return
        self._wait_for_nodes()
        for rnd in range(first, self.cfg.run.rounds + 1):
            self._round(rnd)
        self._round(self.cfg.run.rounds, train=False)  # the last version's evaluation
        self._finish_evals()
        self.ledger.add_event("run", f"run {self.cfg.run.id} finished at version "
                                     f"{self.store.version}")

    def _resume(self) -> int:
        """Where a (re)started run begins: the first round not finished. After a crash the
        leases still open are closed (their replies would reach no one) and the round they
        belong to is done again: its close commits atomically, so nothing of it was
        accepted. Versions made before the crash but never scored are scored here."""
        last = self.ledger.last_train_round()
        open_ = self.ledger.leases(status="issued")
        redo = any(x.kind == Kind.TRAIN and x.round == last for x in open_)
        self._recover(open_, f"; round {last} is done again" if redo else "")
        return last if redo else last + 1

    def _recover(self, open_: list[LeaseRow], note: str = "",
                 due: Callable[[int], bool] = lambda version: True) -> None:
        """After a stop: close the leases left open (their replies would reach no one) and
        score the older versions ``due`` an evaluation that was lost with them (the latest
        is evaluated by the nodes)."""
        now = self.clock()
        for x in open_:
            self.ledger.close_lease(x.id, "expired", now)
        if open_:
            self.ledger.add_event("run", f"resumed: {len(open_)} leases in flight when the "
                                         f"coordinator stopped are closed{note}")
        for v in self.ledger.versions()[:-1]:
            if v.val_loss is None and due(v.version):
                self._evaluate_here(v.version, v.path)

    def _wait_for_nodes(self) -> None:
        if self.checker is not None:
            # while the nodes come and train their first leases (the 2-core bench: the
            # first round closed 3.5 s after its last reply, waiting for this start)
            self.checker.start()
        end = self.clock() + self.cfg.run.wait_for_nodes_s
        while len(self.roster.eligible()) < self.cfg.run.min_nodes and self.clock() < end:
            self.sleep(1.0)
        n = len(self.roster.eligible())
        if n < self.cfg.run.min_nodes:
            self.ledger.add_event("run", f"starting with {n} of {self.cfg.run.min_nodes} "
                                         "wanted nodes online")

    # -- nodes --------------------------------------------------------------------------

    # -- rounds -------------------------------------------------------------------------

    def _round(self, rnd: int, *, train: bool = True) -> None:
        """Lease round ``rnd``'s training on the current version and, queued behind it on
        the same nodes, that version's evaluation if it has none yet; wait for the training
        only. The evaluation is judged when its last reply is in — usually while the nodes
        already train the next version — so it is never a barrier."""
        version = self.store.version
        work: Outbox = {}
        batch = self._train_leases(rnd, work) if train else None
        if version not in self._evaluated:
            self._evaluated.add(version)
            made_in = self.ledger.latest_version()  # its leases carry the round it was made in
            self._eval_leases(made_in.round if made_in is not None else rnd - 1, work)
        self._send(work)
        self._collect(lambda: (batch.open == 0) if batch is not None else not self._evals)
        if batch is not None:
            t0 = time.perf_counter()
            self._prepare(math.inf)  # what the checker processes still hold
            t1 = time.perf_counter()
            self._close_train(rnd, batch)
            log.info("round %d closed: %.3f s for the last checks, %.3f s to judge and "
                     "commit", rnd, t1 - t0, time.perf_counter() - t1)

    def _train_leases(self, rnd: int, work: Outbox) -> TrainBatch | None:
        end = self.clock() + self.cfg.run.wait_for_nodes_s
        self.standing.refresh()
        trust, probation = self.standing.trust(), self.standing.probation()
        while True:
            by_id = {n.id: n for n in self.roster.eligible()}
            checks = plan_spot_checks(sorted(by_id), trust, self.cfg.verify.spot_check_rate,
                                      self.rng, {i: n.institution_id for i, n in by_id.items()},
                                      probation)
            workers = sorted(set(by_id) - set(checks.values()))
            speeds = self.roster.speeds(by_id)
            leases = self.scheduler.lease_train(rnd, workers, self.store.version,
                                                self.store.digest, speeds)
            if leases or self.clock() >= end:
                break
            # A benched node is back after roster.BENCH_S: wait for it rather than burn the round.
            self.sleep(1.0)
        if not leases:
            self.ledger.add_event("round", f"round {rnd}: no eligible node, skipped")
            return None
        # spot checks: the checker trains its worker's shard instead of one of its own
        copies = {c: self.scheduler.lease_duplicate(rnd, c, leases[w], speeds.get(c))
                  for w, c in checks.items() if w in leases}
        batch = TrainBatch("train", self.store.version, trust=trust,
                            pairs=[(leases[w], copies[c]) for w, c in checks.items()
                                   if c in copies])
        for n, lease in {**leases, **copies}.items():
            work.setdefault(n, []).append((lease, batch))
        return batch

    def _close_train(self, rnd: int, batch: TrainBatch) -> None:
        """Judge the round's training together and make the next version from what stands:
        the verdicts, credits, receipts and the version commit together (a coordinator
        killed before the end has accepted nothing of the round, and redoes it)."""
        with self.ledger.atomic("close a round"):
            with metrics.VERIFY_SECONDS.labels("judge").time():
                kept = self._judge_round(rnd, batch.cands, batch.screened_out, batch.pairs)
            if not kept:
                self.ledger.add_event("round", f"round {rnd}: no accepted update; "
                                               f"version {self.store.version} stays")
                return
            trust, weighted = batch.trust, self.cfg.verify.trust_weighting
            weights = [update_weight(c.judged.update.metrics.tokens,
                                     trust.get(c.node.id, NEW_NODE_TRUST) if weighted else 1.0,
                                     self.store.version - c.lease.base_version,
                                     self.cfg.asynchronous.staleness_power) for c in kept]
            t0 = time.perf_counter()
            delta = self.aggregator.aggregate([self._step_arrays(c) for c in kept], weights)
            tokens = sum(c.judged.update.metrics.tokens for c in kept)
            version = self.store.advance(delta, self.ledger, round=rnd, n_updates=len(kept),
                                         tokens=tokens, at=self.clock())
            metrics.OUTER_STEP_SECONDS.observe(time.perf_counter() - t0)
            for c in kept:
                metrics.STALENESS.observe(version - 1 - c.lease.base_version)
            metrics.MODEL_VERSION.set(version)
            self.ledger.add_event("version", f"round {rnd}: version {version} from "
                                             f"{len(kept)} updates ({tokens} tokens)")
        self.roster.note_work(kept)  # committed: the ledger holds them now

    def _step_arrays(self, c: Candidate) -> dict[str, np.ndarray]:
        """What a kept update contributes to the outer step: its pseudo-gradient (its base
        is the current version)."""
        return c.arrays

    def _judge_round(self, rnd: int, cands: list[Candidate], screened_out: list[Lease],
                     pairs: list[tuple[Lease, Lease]]) -> list[Candidate]:
        """Round-level verdicts, then every held lease closed; returns what is aggregated:
        the accepted results, one per shard (a spot check's original before its copy)."""
        at = {c.lease.nonce: i for i, c in enumerate(cands)}
        judged = {id(c) for c in cands}  # what the judge checks now needs no prepare
        for key in judged:
            self._unprepared.pop(key, None)
        bases = {c.lease.base_version: self.store.base(c.lease.base_version) for c in cands}
        self.judge.judge(rnd, bases, cands,
                         [(at[o.nonce], at[c.nonce]) for o, c in pairs
                          if o.nonce in at and c.nonce in at])
        done = {c.lease.shard_id for c in cands if c.standing}
        for lease in screened_out:
            # a rejected original whose copy was accepted has had its shard's work done
            self.scheduler.answered(lease, lease.shard_id in done)
        copies = {c.nonce for _, c in pairs}
        kept, seen = [], set()
        for c in sorted(cands, key=lambda c: c.lease.nonce in copies):  # stable: originals first
            self.scheduler.answered(c.lease, c.lease.shard_id in done)
            if c.standing and c.lease.shard_id not in seen:
                seen.add(c.lease.shard_id)
                kept.append(c)
        return kept

    # -- sending and judging ------------------------------------------------------------

    def _send(self, work: Outbox) -> None:
        """Send every node its leases in order (a train lease, then the evaluation queued
        behind it): each message names what the one after it needs, to fetch while it
        works."""
        # every lease's row first, in one statement: none is sent without its row, and
        # the last node of a pass does not wait for a commit per node before it
        order = sorted(work.items())
        now = self.clock()
        row_ids = iter(self.ledger.record_leases([
            dict(run_id=x.run_id, round=x.round, shard_id=x.shard_id, kind=x.kind,
                 node_id=node_id, base_version=x.base_version, nonce=x.nonce,
                 data_start=x.data_start, data_end=x.data_end, deadline=x.deadline,
                 issued_at=now)
            for node_id, sends in order for x, _ in sends]))
        out: list[tuple[int, Outgoing, Sent]] = []  # (place in its node's queue, ...)
        for node_id, sends in order:
            node = self.roster.rows[node_id]
            leases = [lease for lease, _ in sends]
            for i, (lease, batch) in enumerate(sends):
                self._publish(lease)
                nxt = leases[i + 1] if i + 1 < len(leases) else None
                prefetch = [d for d in _blobs_of(nxt)
                            if d not in (lease.base_digest, lease.data_digest)] if nxt else []
                content = work_content(lease, self.arch, self.cfg.network.blob_mirrors,
                                       self.codec, prefetch=list(dict.fromkeys(prefetch)),
                                       delta=self._deltas.get(lease.base_digest),
                                       init_seed=self.store.init_seed
                                       if lease.base_version == 0 else None)
                # The TTL bounds the reply too: keep it well past the deadline so a slow but
                # honest answer is judged (as late) instead of vanishing inside Flower.
                out.append((i, Outgoing(int(node.flower_node_id), lease.kind, content,
                                        lease.deadline - self.clock() + _TTL_SLACK_S),
                            Sent(lease, node, next(row_ids), batch)))
        # every node's first message before anyone's queued one (a stable sort keeps each
        # node's order): Flower pushes the objects in this order, so the last node's lease
        # is not behind the others' queued evaluations
        out.sort(key=lambda x: x[0])
        msgs, sents = [m for _, m, _ in out], [s for _, _, s in out]
        for mid, sent in zip(self.transport.send(msgs) if msgs else [], sents, strict=True):
            sent.batch.open += 1
            metrics.LEASES_ISSUED.labels(sent.lease.kind).inc()
            if mid is None:  # Flower refused it (it logs why): the shard goes back
                self._failed(sent, "the SuperLink refused the message")
                self._settled(sent.batch)
            else:
                self._pending[mid] = sent
                self._check_ahead(sent.lease)

    def _collect(self, done: Callable[[], bool]) -> None:
        """Take replies (of any batch) as they come and expire the silent, until ``done``."""
        while not done():
            self._pump()
            # checks beside the loop come back while it waits; in it they all run now
            self._prepare(0.0 if self.checker is not None else math.inf)
            if not done():
                self.sleep(_POLL_S)

    def _pump(self) -> None:
        """One pass: take the replies in and expire the silent.

        A reply's lease stops counting as out at once (its node's slot is free), and the
        nodes that answered are handed to ``_answered`` before their replies are screened
        (the asynchronous loop leases them their next work there). Each reply is then
        screened by ``verify``: a failure is recorded (rejected) there and then; the others
        wait in their batch for its verdict. An evaluation whose last lease is settled is
        judged on the spot.
        """
        self._passes += 1  # all of a poll's replies and leases share one read of revocations
        replies = self.transport.poll(list(self._pending))
        revoked = self.roster.revoked(self._passes) if replies else set()
        taken: list[tuple[Sent, RecordDict]] = []
        for reply in replies:
            sent = self._pending.pop(reply.msg_id, None)
            if sent is None:
                continue
            if reply.error is not None or reply.content is None:
                self._failed(sent, reply.error or "empty reply")
                self._settled(sent.batch)
            elif self._handed_back(sent, reply.content):
                self._settled(sent.batch)
            else:
                self.scheduler.received(sent.lease)
                taken.append((sent, reply.content))
        if taken:
            self._answered([sent for sent, _ in taken])
        for sent, content in taken:
            cand = self._screen(sent, content, sent.node.id in revoked)
            if cand is None:
                sent.batch.screened_out.append(sent.lease)
            else:
                sent.batch.cands.append(cand)
            self._settled(sent.batch)
        expired = {lease.nonce for lease in self.scheduler.expire()}
        for mid, sent in list(self._pending.items()) if expired else ():
            if sent.lease.nonce in expired:
                del self._pending[mid]
                self.ledger.close_lease(sent.row_id, "expired", self.clock())
                self.ledger.add_event("reissue", f"{sent.node.name} missed the deadline "
                                      f"of {sent.lease.kind} shard {sent.lease.shard_id}; "
                                      "it goes back to the pool", node_id=sent.node.id)
                self.roster.bench(sent.node, "missed a deadline")
                metrics.LEASES_CLOSED.labels(sent.lease.kind, "expired").inc()
                self._settled(sent.batch)
        if self.task_evals is not None:
            self.task_evals.poll()
            self._retry_tasks()

    def _retry_tasks(self, last: Callable[[], tuple] | None = None) -> bool:
        """Lease again the lm-eval tasks whose last node failed them, and the ``last()``
        version's if it had none (``TaskEvals.more``); True if any went out."""
        assert self.task_evals is not None
        work: Outbox = {}
        for node, lease, batch in self.task_evals.more(
                lambda: [n.id for n in self.roster.eligible()], last):
            work.setdefault(node, []).append((lease, batch))
        if work:
            self._send(work)
        return bool(work)

    def _publish_ahead(self, n: int = _AHEAD) -> None:
        """Write the next ``n`` pooled shards' blobs now, while the loop is idle: a blob
        is a new file (~0.2-0.9 ms on this machine), one per lease written as the lease
        went out was half of a lease's cost at 1,000 nodes (bench/scale.py)."""
        assert self.blobs is not None
        for start, end in self.scheduler.upcoming(n):
            if (start, end) in self._published:
                continue
            digest = self.scheduler.data_digest(start, end)
            if not self.blobs.has(digest):
                self.blobs.put(shard_bytes(self.tokens[start:end], self.corpus.dtype), digest)
            self._published.add((start, end))

    def _settled(self, batch: Batch) -> None:
        batch.open -= 1
        if batch.open == 0 and isinstance(batch, EvalBatch):
            self._close_eval(batch)
        elif batch.open == 0 and isinstance(batch, TaskBatch):
            assert self.task_evals is not None
            self.task_evals.settled(batch)

    def _publish(self, lease: Lease) -> None:
        """Put what ``lease`` names into the blob store (once: blobs are named by content),
        and the current version as a change to the previous one, where the run makes it."""
        assert self.blobs is not None
        store = self.store
        if lease.base_digest == store.digest and not self.blobs.has(store.digest):
            self.blobs.put(arrays_to_bytes(store.arrays), store.digest)
            if store.delta is not None:
                self._deltas[store.digest] = (
                    store.delta.base, self.blobs.put(arrays_to_bytes(store.delta.encoding)))
        if lease.kind == Kind.TASKS:  # its bundle and tokenizer were put at the start
            return
        span = (lease.data_start, lease.data_end)
        if span not in self._published and not self.blobs.has(lease.data_digest):
            self.blobs.put(shard_bytes(self.tokens[span[0]:span[1]], self.corpus.dtype),
                           lease.data_digest)
        self._published.add(span)

    def _answered(self, sents: list[Sent]) -> None:
        """What the nodes of ``sents`` get before their replies are screened: nothing in
        lock-step rounds (a node's next lease is the next round's)."""

    def _screen(self, sent: Sent, content: RecordDict, revoked: bool) -> Candidate | None:
        """``verify`` one reply (from a node ``revoked`` or not): a Candidate for its phase's
        verdict, or None once a rejection has been recorded."""
        now, t0 = self.clock(), time.perf_counter()
        version, max_staleness = self._expected_base(sent)
        judged = screen_reply(
            content, lease=sent.lease, node_id=sent.node.id,
            public_key_pem=sent.node.public_key_pem.encode(), version=version,
            shapes=self.store.shapes(), cfg=self.cfg, ledger=self.ledger, now=now,
            blobs=self.blobs, max_staleness=max_staleness, revoked=revoked)
        metrics.VERIFY_SECONDS.labels("screen").observe(time.perf_counter() - t0)
        if sent.lease.kind == Kind.TRAIN:
            self.judge.cost.screen_s += time.perf_counter() - t0
            self.judge.cost.updates += 1
        if judged.verdict.accepted:
            cand = Candidate(judged, sent.lease, sent.row_id, sent.node, now)
            if sent.lease.kind == Kind.TRAIN:  # its own checks soon, not at the round's end
                self._unprepared[id(cand)] = cand
            return cand
        record_judged(judged, lease=sent.lease, lease_row_id=sent.row_id, node_id=sent.node.id,
                      node_name=sent.node.name, cfg=self.cfg, ledger=self.ledger, now=now,
                      issuer=self.issuer)
        return None

    def _expected_base(self, sent: Sent) -> tuple[int, int]:
        """The version a reply must be built on, and how many versions behind it may be:
        here exactly its batch's (a round's training, a version's evaluation)."""
        return sent.batch.version, 0

    def _handed_back(self, sent: Sent, content: RecordDict) -> bool:
        """Take ``content`` as the node handing the lease back, if it is that (False for
        any other reply; a malformed hand-back, or one naming another lease, is screened and
        rejected as any malformed reply is).

        The node's policy said pause (a time window, a busy GPU, a batch job ending): the
        shard goes back to the pool front, the lease closes with neither credit nor penalty
        (no update row: trust and the node's counts never see it), and the node gets nothing
        until it said to come back."""
        try:
            back = parse_handback(content)
        except ProtocolError:
            return False
        if back is None or back.nonce != sent.lease.nonce:
            return False
        now = self.clock()
        self.scheduler.release(sent.lease, reason=back.reason)
        self.ledger.close_lease(sent.row_id, "handed_back", now)
        metrics.LEASES_CLOSED.labels(sent.lease.kind, "handed_back").inc()
        wait = min(max(back.retry_after_s, _HANDBACK_S[0]), _HANDBACK_S[1])
        self.roster.bench(sent.node, f"handed a lease back ({back.reason})", wait)
        self.ledger.add_event("handback", f"{sent.node.name} handed back {sent.lease.kind} "
                              f"shard {sent.lease.shard_id} ({back.reason}); no work for it "
                              f"for {wait:.0f} s", node_id=sent.node.id)
        return True

    def _failed(self, sent: Sent, error: str) -> None:
        self.scheduler.release(sent.lease, reason=error)
        self.ledger.close_lease(sent.row_id, "failed", self.clock())
        metrics.LEASES_CLOSED.labels(sent.lease.kind, "failed").inc()
        self.ledger.add_event("reissue", f"{sent.node.name} failed {sent.lease.kind} shard "
                              f"{sent.lease.shard_id} ({error.splitlines()[0][:160]}); "
                              "it goes back to the pool", node_id=sent.node.id)
        self.roster.bench(sent.node, "failed a lease")

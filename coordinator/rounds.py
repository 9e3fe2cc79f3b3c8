"""The run loop: lease shards to online nodes, judge what comes back, make model versions.

One round = a train phase (each eligible node trains one distinct shard from the current
version, except spot checkers, which train another node's shard again; each reply is
screened by ``verifier.verify`` as it arrives, and once all are in, ``round_judge`` judges
them together; accepted pseudo-gradients are aggregated and applied with the outer
optimizer) and an eval phase (the validation slice is split over the nodes, some pieces
also leased to a second node for a quorum; ``eval_judge`` recomputes a sample of every reply's
windows; the version's validation loss sums the accepted replies, and any part no accepted
reply covers is evaluated here, so every version gets a validation loss that was checked).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict

from protocol.blobstore import BlobDir
from protocol.digest import arrays_to_bytes
from protocol.messages import Lease, work_content
from training.corpus import CorpusInfo
from training.shards import data_digest, make_shards

from .aggregators import get_aggregator
from .config import RunConfig
from .credits import ReceiptIssuer
from .eval_judge import EvalJudge, plan_quorum, validation_loss
from .judging import record_judged, screen_reply
from .ledger import Ledger, Node
from .model_store import ModelStore
from .round_judge import Candidate, RoundJudge
from .scheduler import Scheduler
from .transport import Transport
from .trust import NEW_NODE_TRUST, PROBATION_UPDATES, plan_spot_checks

__all__ = ["RunLoop"]

log = logging.getLogger(__name__)

_POLL_S = 0.2
_TTL_SLACK_S = 600.0
_BENCH_S = 90.0  # a node that missed a deadline sits out this long (Flower needs ~70 s to drop it)


@dataclass(frozen=True)
class _Sent:
    lease: Lease
    node: Node
    row_id: int


@dataclass
class RunLoop:
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
    _nodes: dict[int, Node] = field(default_factory=dict)  # by Flower id
    _benched: dict[int, float] = field(default_factory=dict)  # ledger id -> until
    _seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tokens = self.corpus.tokens()
        if self.blobs is None:
            self.blobs = BlobDir(self.store.dir.parent / "blobs")
        lo, hi = self.corpus.train_range
        shards = [(s.shard_id, s.start, s.end) for s in make_shards(lo, hi, self.cfg.shard_tokens)]
        self.scheduler = Scheduler(run_id=self.cfg.run.id, shards=shards, train=self.cfg.train,
                                   data_digest=lambda a, b: data_digest(self.tokens[a:b]),
                                   clock=self.clock)
        accepted = {u.lease_id for u in self.ledger.updates() if u.verdict == "accepted"}
        # a spot-checked shard may have two accepted results in its round: it counts once
        done = {(lease.round, lease.shard_id): lease.shard_id for lease in self.ledger.leases()
                if lease.kind == "train" and lease.id in accepted}
        self.scheduler.restore(list(done.values()))
        self.aggregator = get_aggregator(self.cfg.aggregation.method,
                                         dataclasses.asdict(self.cfg.aggregation))
        self.arch = dataclasses.asdict(self.store.gpt)
        self.codec = self.cfg.codec()
        self.judge = RoundJudge(self.cfg, self.ledger, self.store.gpt, self.tokens,
                                self.corpus.val_range, self.rng, self.issuer)
        self.eval_judge = EvalJudge(self.cfg, self.ledger, self.store.gpt, self.tokens,
                                    self.rng, self.issuer)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        first = self._last_round() + 1
        if first > self.cfg.run.rounds:
            log.info("all %d rounds already done", self.cfg.run.rounds)
            return
        self._wait_for_nodes()
        latest = self.ledger.latest_version()
        if latest is not None and latest.val_loss is None:
            self._eval_phase(first - 1)
        for rnd in range(first, self.cfg.run.rounds + 1):
            if self._train_phase(rnd):
                self._eval_phase(rnd)
        self.ledger.add_event("run", f"run {self.cfg.run.id} finished at version "
                                     f"{self.store.version}")

    def _last_round(self) -> int:
        return max((lease.round for lease in self.ledger.leases()), default=0)

    def _wait_for_nodes(self) -> None:
        end = self.clock() + self.cfg.run.wait_for_nodes_s
        while len(self._eligible()) < self.cfg.run.min_nodes and self.clock() < end:
            self.sleep(1.0)
        n = len(self._eligible())
        if n < self.cfg.run.min_nodes:
            self.ledger.add_event("run", f"starting with {n} of {self.cfg.run.min_nodes} "
                                         "wanted nodes online")

    # -- nodes --------------------------------------------------------------------------

    def _eligible(self) -> list[Node]:
        now, out = self.clock(), []
        online = set(self.transport.online())
        for fid in sorted(online):
            # Read afresh (not from _nodes): a node revoked mid-run gets no further lease.
            node = self.ledger.node_by_flower_id(str(fid))
            if node is None or node.revoked:
                continue
            self._nodes[fid] = node
            if fid not in self._seen:
                self.ledger.add_event("online", f"{node.name} is online", node_id=node.id)
            if self._benched.get(node.id, 0.0) <= now:
                out.append(node)
            self.ledger.touch_node(node.id, now)
        for fid in self._seen - online:
            if (node := self._nodes.get(fid)) is not None:
                self.ledger.add_event("leave", f"{node.name} went offline", node_id=node.id)
        self._seen = online
        return out

    def _bench(self, node: Node, why: str) -> None:
        self._benched[node.id] = self.clock() + _BENCH_S
        log.info("benching %s: %s", node.name, why)

    # -- phases -------------------------------------------------------------------------

    def _train_phase(self, rnd: int) -> bool:
        end = self.clock() + self.cfg.run.wait_for_nodes_s
        trust = {s.node_id: s.trust for s in self.ledger.node_summaries()}
        probation = self.ledger.lost_spot_check_within(PROBATION_UPDATES)
        while True:
            by_id = {n.id: n for n in self._eligible()}
            checks = plan_spot_checks(sorted(by_id), trust, self.cfg.verify.spot_check_rate,
                                      self.rng, {i: n.institution_id for i, n in by_id.items()},
                                      probation)
            workers = sorted(set(by_id) - set(checks.values()))
            leases = self.scheduler.lease_train(rnd, workers, self.store.version,
                                                self.store.digest)
            if leases or self.clock() >= end:
                break
            # A benched node is back after _BENCH_S: wait for it rather than burn the round.
            self.sleep(1.0)
        if not leases:
            self.ledger.add_event("round", f"round {rnd}: no eligible node, skipped")
            return False
        # spot checks: the checker trains its worker's shard instead of one of its own
        copies = {c: self.scheduler.lease_duplicate(rnd, c, leases[w])
                  for w, c in checks.items() if w in leases}
        work = [(by_id[n], [lease]) for n, lease in sorted({**leases, **copies}.items())]
        cands, screened_out = self._dispatch(work)
        kept = self._judge_round(rnd, cands, screened_out,
                                 [(leases[w], copies[c]) for w, c in checks.items() if c in copies])
        if not kept:
            self.ledger.add_event("round", f"round {rnd}: no accepted update; "
                                           f"version {self.store.version} stays")
            return False
        weights = [float(c.judged.update.metrics.tokens) * (
            trust.get(c.node.id, NEW_NODE_TRUST) if self.cfg.verify.trust_weighting else 1.0)
            for c in kept]
        delta = self.aggregator.aggregate([c.arrays for c in kept], weights)
        tokens = sum(c.judged.update.metrics.tokens for c in kept)
        version = self.store.advance(delta, self.ledger, round=rnd, n_updates=len(kept),
                                     tokens=tokens)
        self.ledger.add_event("version", f"round {rnd}: version {version} from "
                                         f"{len(kept)} updates ({tokens} tokens)")
        return True

    def _judge_round(self, rnd: int, cands: list[Candidate], screened_out: list[Lease],
                     pairs: list[tuple[Lease, Lease]]) -> list[Candidate]:
        """Round-level verdicts, then every held lease closed; returns what is aggregated:
        the accepted results, one per shard (a spot check's original before its copy)."""
        at = {c.lease.nonce: i for i, c in enumerate(cands)}
        self.judge.judge(rnd, self.store.arrays, cands,
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

    def _eval_phase(self, rnd: int) -> None:
        lo, hi = self.corpus.val_range
        hi = min(hi, lo + self.cfg.data.eval_tokens)
        nodes = {n.id: n for n in self._eligible()}
        leases = self.scheduler.lease_eval(rnd, sorted(nodes), self.store.version,
                                           self.store.digest, [(lo, hi)])
        quorum = plan_quorum(leases, {i: n.institution_id for i, n in nodes.items()},
                             self.cfg.verify.eval_quorum_rate, self.rng)
        copies = []
        for of, node in quorum:
            copy = self.scheduler.lease_eval_copy(rnd, node, of)
            leases[node].append(copy)
            copies.append((of, copy))
        cands, screened_out = self._dispatch([(nodes[n], ls) for n, ls in leases.items()])
        # originals first: the published loss takes a range from its first accepted reply
        copy_nonces = {c.nonce for _, c in copies}
        cands.sort(key=lambda c: c.lease.nonce in copy_nonces)
        at = {c.lease.nonce: i for i, c in enumerate(cands)}
        base = self.store.arrays
        ids = self.eval_judge.judge(base, cands, [(at[o.nonce], at[c.nonce]) for o, c in copies
                                                  if o.nonce in at and c.nonce in at])
        for lease in screened_out:
            self.scheduler.answered(lease, False)
        for c in cands:
            self.scheduler.answered(c.lease, c.standing)
        val = validation_loss(cands, ids, (lo, hi),
                              lambda a, b: self.eval_judge.evaluate_range(base, a, b))
        self.ledger.set_val_loss(self.store.version, val.loss, val.tokens,
                                 update_ids=val.update_ids,
                                 windows_recomputed=self.eval_judge.recomputed,
                                 local_tokens=val.local_tokens)
        log.info("version %d: val loss %s over %d tokens (%d from %d accepted replies, %d "
                 "evaluated here; %d windows recomputed)", self.store.version, val.loss,
                 val.tokens, val.tokens - val.local_tokens, len(val.update_ids),
                 val.local_tokens, self.eval_judge.recomputed)

    # -- sending and judging ------------------------------------------------------------

    def _dispatch(self, work: list[tuple[Node, list[Lease]]]
                  ) -> tuple[list[Candidate], list[Lease]]:
        """Send every lease, screen replies as they come, expire the silent.

        Replies that fail ``verify`` are recorded (rejected) at once; the others stay open in
        the scheduler for their phase's verdict. Returns (the replies that passed ``verify``
        as ``Candidate``s, the leases of those that did not).
        """
        pending: dict[str, _Sent] = {}
        for node, leases in work:
            for lease in leases:
                row = self.ledger.record_lease(
                    run_id=lease.run_id, round=lease.round, shard_id=lease.shard_id,
                    kind=lease.kind, node_id=node.id, base_version=lease.base_version,
                    nonce=lease.nonce, data_start=lease.data_start, data_end=lease.data_end,
                    deadline=lease.deadline)
                self._publish(lease)
                content = work_content(lease, self.arch, self.cfg.network.blob_mirrors,
                                       self.codec)
                # The TTL bounds the reply too: keep it well past the deadline so a slow but
                # honest answer is judged (as late) instead of vanishing inside Flower.
                mid = self.transport.send(int(node.flower_node_id), lease.kind, content,
                                          ttl=lease.deadline - self.clock() + _TTL_SLACK_S)
                pending[mid] = _Sent(lease, node, row.id)
        cands: list[Candidate] = []
        screened_out: list[Lease] = []
        while pending:
            for reply in self.transport.poll(list(pending)):
                sent = pending.pop(reply.msg_id, None)
                if sent is None:
                    continue
                if reply.error is not None or reply.content is None:
                    self._failed(sent, reply.error or "empty reply")
                    continue
                cand = self._screen(sent, reply.content)
                if cand is None:
                    screened_out.append(sent.lease)
                else:
                    cands.append(cand)
            expired = {lease.nonce for lease in self.scheduler.expire()}
            for mid, sent in list(pending.items()):
                if sent.lease.nonce in expired:
                    del pending[mid]
                    self.ledger.close_lease(sent.row_id, "expired", self.clock())
                    self.ledger.add_event("reissue", f"{sent.node.name} missed the deadline "
                                          f"of {sent.lease.kind} shard {sent.lease.shard_id}; "
                                          "it goes back to the pool", node_id=sent.node.id)
                    self._bench(sent.node, "missed a deadline")
            if pending:
                self.sleep(_POLL_S)
        return cands, screened_out

    def _publish(self, lease: Lease) -> None:
        """Put what ``lease`` names into the blob store (once: blobs are named by content)."""
        assert self.blobs is not None
        if lease.base_digest == self.store.digest and not self.blobs.has(self.store.digest):
            self.blobs.put(arrays_to_bytes(self.store.arrays), self.store.digest)
        if not self.blobs.has(lease.data_digest):
            data = np.asarray(self.tokens[lease.data_start:lease.data_end]).astype("<u2")
            self.blobs.put(data.tobytes(), lease.data_digest)

    def _screen(self, sent: _Sent, content: RecordDict) -> Candidate | None:
        """``verify`` one reply: a Candidate for its phase's verdict, or None once a
        rejection has been recorded."""
        now, t0 = self.clock(), time.perf_counter()
        judged = screen_reply(
            content, lease=sent.lease, node_id=sent.node.id,
            public_key_pem=sent.node.public_key_pem.encode(), version=self.store.version,
            shapes=self.store.shapes(), cfg=self.cfg, ledger=self.ledger, now=now,
            blobs=self.blobs)
        if sent.lease.kind == "train":
            self.judge.cost.screen_s += time.perf_counter() - t0
            self.judge.cost.updates += 1
        self.scheduler.received(sent.lease)
        if judged.verdict.accepted:
            return Candidate(judged, sent.lease, sent.row_id, sent.node, now)
        record_judged(judged, lease=sent.lease, lease_row_id=sent.row_id, node_id=sent.node.id,
                      cfg=self.cfg, ledger=self.ledger, now=now, issuer=self.issuer)
        self.ledger.add_event("reject", f"{sent.node.name}: {judged.verdict.reason}"
                                        f" — {judged.verdict.detail}", node_id=sent.node.id)
        return None

    def _failed(self, sent: _Sent, error: str) -> None:
        self.scheduler.release(sent.lease, reason=error)
        self.ledger.close_lease(sent.row_id, "failed", self.clock())
        self.ledger.add_event("reissue", f"{sent.node.name} failed {sent.lease.kind} shard "
                              f"{sent.lease.shard_id} ({error.splitlines()[0][:160]}); "
                              "it goes back to the pool", node_id=sent.node.id)
        self._bench(sent.node, "failed a lease")


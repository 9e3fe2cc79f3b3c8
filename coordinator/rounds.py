"""The run loop: lease shards to online nodes, judge what comes back, make model versions.

One round = a train phase (each eligible node trains one distinct shard from the current
version, except spot checkers, which train another node's shard again; each reply is
screened by ``verifier.verify`` as it arrives, and once all are in, ``round_judge`` judges
them together; accepted pseudo-gradients are aggregated and applied with the outer
optimizer) and an eval phase (the validation slice is split over the nodes; any part no node
answered is evaluated here, so every version gets a validation loss).
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

from protocol.messages import Lease, work_content
from training.corpus import CorpusInfo
from training.evaluate import evaluate
from training.shards import data_digest, make_shards

from .aggregators import get_aggregator
from .config import RunConfig
from .credits import ReceiptIssuer
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
    # spot checks and held-out batches: unpredictable to nodes (tests pass a seeded Random)
    rng: random.Random = field(default_factory=random.SystemRandom)
    _nodes: dict[int, Node] = field(default_factory=dict)  # by Flower id
    _benched: dict[int, float] = field(default_factory=dict)  # ledger id -> until
    _seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tokens = self.corpus.tokens()
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
        self.judge = RoundJudge(self.cfg, self.ledger, self.store.gpt, self.tokens,
                                self.corpus.val_range, self.rng, self.issuer)

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
        cands, screened_out = self._dispatch(work, hold=True)
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
        results, _ = self._dispatch([(nodes[n], ls) for n, ls in leases.items()])
        loss_sum, count = 0.0, 0
        covered = np.zeros(hi - lo, dtype=bool)
        for update, _ in results:
            lease = update.lease
            covered[lease.data_start - lo:lease.data_end - lo] = True
            loss_sum += update.metrics.loss_before * update.metrics.tokens
            count += update.metrics.tokens
        for start, end in _gaps(covered, lo):
            # Nobody answered this part: evaluate it here rather than leave a hole.
            res = evaluate(self.store.arrays, self.store.gpt, np.asarray(self.tokens[start:end]),
                           seq_len=self.cfg.train.seq_len, batch_size=self.cfg.train.batch_size)
            loss_sum, count = loss_sum + res.loss_sum, count + res.tokens
        val = loss_sum / count if count else None
        self.ledger.set_val_loss(self.store.version, val, count)
        log.info("version %d: val loss %s over %d tokens", self.store.version, val, count)

    # -- sending and judging ------------------------------------------------------------

    def _dispatch(self, work: list[tuple[Node, list[Lease]]], hold: bool = False) -> tuple:
        """Send every lease, screen replies as they come, expire the silent.

        Without ``hold`` replies are judged at once; returns (accepted (update, arrays)
        pairs, []). With ``hold`` (train) rejections are recorded at once but every answered
        lease stays open in the scheduler for the round's verdict; returns (the replies that
        passed ``verify`` as ``Candidate``s, the leases of those that did not).
        """
        pending: dict[str, _Sent] = {}
        for node, leases in work:
            for lease in leases:
                row = self.ledger.record_lease(
                    run_id=lease.run_id, round=lease.round, shard_id=lease.shard_id,
                    kind=lease.kind, node_id=node.id, base_version=lease.base_version,
                    nonce=lease.nonce, data_start=lease.data_start, data_end=lease.data_end,
                    deadline=lease.deadline)
                content = work_content(
                    lease, self.store.arrays,
                    np.asarray(self.tokens[lease.data_start:lease.data_end]), arch=self.arch)
                # The TTL bounds the reply too: keep it well past the deadline so a slow but
                # honest answer is judged (as late) instead of vanishing inside Flower.
                mid = self.transport.send(int(node.flower_node_id), lease.kind, content,
                                          ttl=lease.deadline - self.clock() + _TTL_SLACK_S)
                pending[mid] = _Sent(lease, node, row.id)
        out: list = []
        screened_out: list[Lease] = []
        while pending:
            for reply in self.transport.poll(list(pending)):
                sent = pending.pop(reply.msg_id, None)
                if sent is None:
                    continue
                if reply.error is not None or reply.content is None:
                    self._failed(sent, reply.error or "empty reply")
                    continue
                self._screen(sent, reply.content, hold, out, screened_out)
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
        return out, screened_out

    def _screen(self, sent: _Sent, content: RecordDict, hold: bool, out: list,
                screened_out: list[Lease]) -> None:
        now, t0 = self.clock(), time.perf_counter()
        judged = screen_reply(
            content, lease=sent.lease, node_id=sent.node.id,
            public_key_pem=sent.node.public_key_pem.encode(), version=self.store.version,
            shapes=self.store.shapes(), cfg=self.cfg, ledger=self.ledger, now=now)
        if hold:
            self.judge.cost.screen_s += time.perf_counter() - t0
            self.judge.cost.updates += 1
            self.scheduler.received(sent.lease)
            if judged.verdict.accepted:
                out.append(Candidate(judged, sent.lease, sent.row_id, sent.node, now))
                return
            screened_out.append(sent.lease)
        else:
            self.scheduler.answered(sent.lease, judged.verdict.accepted)
        record_judged(judged, lease=sent.lease, lease_row_id=sent.row_id, node_id=sent.node.id,
                      cfg=self.cfg, ledger=self.ledger, now=now, issuer=self.issuer)
        if judged.verdict.accepted:
            out.append((judged.update, judged.arrays))
        else:
            self.ledger.add_event("reject", f"{sent.node.name}: {judged.verdict.reason}"
                                            f" — {judged.verdict.detail}", node_id=sent.node.id)

    def _failed(self, sent: _Sent, error: str) -> None:
        self.scheduler.release(sent.lease, reason=error)
        self.ledger.close_lease(sent.row_id, "failed", self.clock())
        self.ledger.add_event("reissue", f"{sent.node.name} failed {sent.lease.kind} shard "
                              f"{sent.lease.shard_id} ({error.splitlines()[0][:160]}); "
                              "it goes back to the pool", node_id=sent.node.id)
        self._bench(sent.node, "failed a lease")


def _gaps(covered: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """Maximal runs of False in ``covered`` as absolute (start, end) ranges."""
    edges = np.diff(np.concatenate(([1], covered.astype(np.int8), [1])))
    starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
    return [(offset + int(s), offset + int(e)) for s, e in zip(starts, ends)]

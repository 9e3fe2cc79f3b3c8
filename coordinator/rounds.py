"""The run loop: lease shards to online nodes, judge what comes back, make model versions.

One round = a train phase (each eligible node trains one distinct shard from the current
version; accepted pseudo-gradients are aggregated and applied with the outer optimizer) and
an eval phase (the validation slice is split over the nodes; any part no node answered is
evaluated here, so every version gets a validation loss).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protocol.messages import Lease, work_content
from training.corpus import CorpusInfo
from training.evaluate import evaluate
from training.shards import data_digest, make_shards

from .aggregators import get_aggregator
from .config import RunConfig
from .credits import ReceiptIssuer
from .judging import judge_reply
from .ledger import Ledger, Node
from .model_store import ModelStore
from .scheduler import Scheduler
from .transport import Transport

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
        self.scheduler.restore([lease.shard_id for lease in self.ledger.leases()
                                if lease.kind == "train" and lease.id in accepted])
        self.aggregator = get_aggregator(self.cfg.aggregation.method,
                                         dataclasses.asdict(self.cfg.aggregation))
        self.arch = {k: v for k, v in dataclasses.asdict(self.store.gpt).items()}

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
        while True:
            by_id = {n.id: n for n in self._eligible()}
            leases = self.scheduler.lease_train(rnd, sorted(by_id), self.store.version,
                                                self.store.digest)
            if leases or self.clock() >= end:
                break
            # A benched node is back after _BENCH_S: wait for it rather than burn the round.
            self.sleep(1.0)
        if not leases:
            self.ledger.add_event("round", f"round {rnd}: no eligible node, skipped")
            return False
        accepted = self._dispatch([(by_id[n], [lease]) for n, lease in leases.items()])
        if not accepted:
            self.ledger.add_event("round", f"round {rnd}: no accepted update; "
                                           f"version {self.store.version} stays")
            return False
        weights = [float(u.metrics.tokens) for u, _ in accepted]
        delta = self.aggregator.aggregate([a for _, a in accepted], weights)
        version = self.store.advance(delta, self.ledger, round=rnd, n_updates=len(accepted),
                                     tokens=int(sum(weights)))
        self.ledger.add_event("version", f"round {rnd}: version {version} from "
                                         f"{len(accepted)} updates ({int(sum(weights))} tokens)")
        return True

    def _eval_phase(self, rnd: int) -> None:
        lo, hi = self.corpus.val_range
        hi = min(hi, lo + self.cfg.data.eval_tokens)
        nodes = {n.id: n for n in self._eligible()}
        leases = self.scheduler.lease_eval(rnd, sorted(nodes), self.store.version,
                                           self.store.digest, [(lo, hi)])
        results = self._dispatch([(nodes[n], ls) for n, ls in leases.items()])
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

    def _dispatch(self, work: list[tuple[Node, list[Lease]]]) -> list[tuple]:
        """Send every lease, judge replies as they come, expire the silent; return the
        accepted (update, arrays) pairs."""
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
        accepted: list[tuple] = []
        while pending:
            for reply in self.transport.poll(list(pending)):
                sent = pending.pop(reply.msg_id, None)
                if sent is None:
                    continue
                if reply.error is not None or reply.content is None:
                    self._failed(sent, reply.error or "empty reply")
                    continue
                judged = judge_reply(
                    reply.content, lease=sent.lease, lease_row_id=sent.row_id,
                    node_id=sent.node.id, public_key_pem=sent.node.public_key_pem.encode(),
                    version=self.store.version, shapes=self.store.shapes(), cfg=self.cfg,
                    ledger=self.ledger, now=self.clock(), issuer=self.issuer)
                self.scheduler.answered(sent.lease, judged.verdict.accepted)
                if judged.verdict.accepted:
                    accepted.append((judged.update, judged.arrays))
                else:
                    self.ledger.add_event("reject", f"{sent.node.name}: {judged.verdict.reason}"
                                                    f" — {judged.verdict.detail}",
                                          node_id=sent.node.id)
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
        return accepted

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

"""How a model version's evaluation is leased, collected and judged (part of ``RunLoop``).

Version v's validation slice is split over the nodes, each piece queued behind the node's
train lease (some pieces also to a second node for a quorum), and the lm-eval tasks lease
when one is due. The evaluation is judged when its last reply is in: ``eval_judge``
recomputes a sample of every reply's windows, and v's validation loss sums the accepted
replies plus whatever no accepted reply covers, evaluated here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from training.checkpoint import load_checkpoint

from coordinator.run.batches import EvalBatch
from coordinator.verify.eval_judge import plan_quorum, validation_loss

if TYPE_CHECKING:
    from coordinator.run.loop import Outbox

__all__ = ["EvalRounds"]

log = logging.getLogger("coordinator.run.loop")  # (its lines read as the loop's, as before)


class EvalRounds:
    """``RunLoop``'s evaluation methods; the state they use is the loop's."""

    _evals: list[EvalBatch]
    _evaluated: set[int]
    cfg: Any
    corpus: Any
    eval_judge: Any
    ledger: Any
    rng: Any
    roster: Any
    scheduler: Any
    store: Any
    task_evals: Any

    if TYPE_CHECKING:  # the loop's own
        def _collect(self, done: Callable[[], bool]) -> None: ...

        def _retry_tasks(self, last: Callable[[], tuple] | None = None) -> bool: ...

    def _evaluate_here(self, version: int, path: str) -> None:
        """Score an older version the coordinator itself (its evaluation was in flight when
        the coordinator stopped, and the nodes have moved on)."""
        base, _ = load_checkpoint(path)
        loss_sum, tokens = self.eval_judge.evaluate_range(base, *self._val_span())
        self.ledger.set_val_loss(version, loss_sum / tokens if tokens else None, tokens,
                                 windows_recomputed=0, local_tokens=tokens)
        self._evaluated.add(version)

    def _val_span(self) -> tuple[int, int]:
        """The validation tokens every version is scored on: the first ``eval_tokens``."""
        lo, hi = self.corpus.val_range
        return lo, min(hi, lo + self.cfg.data.eval_tokens)

    def _eval_leases(self, rnd: int, work: Outbox) -> None:
        """Split the validation slice of the current version over the nodes (some pieces to
        a second node for a quorum), each queued behind the node's train lease."""
        lo, hi = self._val_span()
        nodes = {n.id: n for n in self.roster.eligible()}
        leases = self.scheduler.lease_eval(rnd, sorted(nodes), self.store.version,
                                           self.store.digest, [(lo, hi)],
                                           self.roster.speeds(nodes))
        quorum = plan_quorum(leases, {i: n.institution_id for i, n in nodes.items()},
                             self.cfg.verify.eval_quorum_rate, self.rng)
        batch = EvalBatch("eval", self.store.version, base=self.store.arrays, span=(lo, hi))
        for of, node in quorum:
            copy = self.scheduler.lease_eval_copy(rnd, node, of)
            leases[node].append(copy)
            batch.copies.append((of, copy))
        for n, ls in leases.items():
            work.setdefault(n, []).extend((lease, batch) for lease in ls)
        self._evals.append(batch)
        tasks = self.task_evals
        if tasks is not None and tasks.due(self.store.version, rnd):
            got = tasks.lease(rnd, self.store.version, self.store.digest, sorted(nodes),
                              self.store.arrays)
            if got is not None:
                node, lease, task_batch = got
                work.setdefault(node, []).append((lease, task_batch))
        if not leases:  # no node free to evaluate: the coordinator does it all
            self._close_eval(batch)

    def _evals_open(self) -> bool:
        """Some version's evaluation (its lm-eval tasks lease included) is still out."""
        return bool(self._evals) or (self.task_evals is not None and self.task_evals.out)

    def _finish_evals(self) -> None:
        """At the run's end: every evaluation answered, and its tasks verdicts recorded (a
        rejected one leased again, until a node's answers stand or ``MAX_TRIES``). The last
        version gets its tasks lease here if it had none (its round accepted nothing, so it
        was made, and evaluated, a round earlier; or a restart lost the lease)."""
        if self.task_evals is not None:
            s = self.store
            self._retry_tasks(lambda: (self.ledger.latest_version().round, s.version, s.digest,
                                       s.arrays))
        while True:
            self._collect(lambda: not self._evals_open())
            if self.task_evals is None:
                return
            self.task_evals.finish()
            if not self._retry_tasks():
                return

    def _close_eval(self, batch: EvalBatch) -> None:
        """Judge a version's evaluation once every lease of it is answered, and publish the
        version's validation loss from what was accepted (and the coordinator's own
        evaluation of whatever no accepted reply covers)."""
        self._evals.remove(batch)
        cands, copies = batch.cands, batch.copies
        # originals first: the published loss takes a range from its first accepted reply
        copy_nonces = {c.nonce for _, c in copies}
        cands.sort(key=lambda c: c.lease.nonce in copy_nonces)
        at = {c.lease.nonce: i for i, c in enumerate(cands)}
        base = batch.base
        # the verdicts, credits and the loss they make commit together
        with self.ledger.atomic("close an evaluation"):
            ids = self.eval_judge.judge(base, cands, [(at[o.nonce], at[c.nonce])
                                                      for o, c in copies
                                                      if o.nonce in at and c.nonce in at])
            val = validation_loss(cands, ids, batch.span,
                                  lambda a, b: self.eval_judge.evaluate_range(base, a, b))
            self.ledger.set_val_loss(batch.version, val.loss, val.tokens,
                                     update_ids=val.update_ids,
                                     windows_recomputed=self.eval_judge.recomputed,
                                     local_tokens=val.local_tokens)
        for lease in batch.screened_out:
            self.scheduler.answered(lease, False)
        for c in cands:
            self.scheduler.answered(c.lease, c.standing)
        log.info("version %d: val loss %s over %d tokens (%d from %d accepted replies, %d "
                 "evaluated here; %d windows recomputed)", batch.version, val.loss,
                 val.tokens, val.tokens - val.local_tokens, len(val.update_ids),
                 val.local_tokens, self.eval_judge.recomputed)

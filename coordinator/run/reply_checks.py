"""The train replies' own checks (base check, usefulness scores) as the run loop runs them:
in the loop, in slices between its other work, or in checker processes beside it
(``verify.checker``), where each train lease's base-side checks start as it is issued (part
of ``RunLoop``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from protocol.messages import Kind, Lease

from coordinator.verify.checker import Checker
from coordinator.verify.round_judge import Candidate
from coordinator.verify.scoring import CheckJob

__all__ = ["ReplyChecks"]

log = logging.getLogger("coordinator.run.loop")  # (its lines read as the loop's, as before)

_CHECK_WAIT_S = 0.5  # a wait for the checker, between looks whether it is still alive


class ReplyChecks:
    """``RunLoop``'s methods for the replies' own checks; the state they use is the loop's."""

    checker: Checker | None
    _unprepared: dict[int, Candidate]
    _checking: dict[int, tuple[Candidate, CheckJob]]  # out at the checker, by job id
    _warming: dict[int, CheckJob]  # checker jobs of issued leases
    blobs: Any
    clock: Any
    judge: Any
    ledger: Any
    store: Any
    task_evals: Any

    def _prepare(self, budget_s: float) -> bool:
        """Run the screened replies' own checks (base check, usefulness scores) in arrival
        order; True if some are still to come. Beside the loop (``verify.checker``) they
        are queued and whatever came back is taken, waiting ``budget_s`` only if it is
        ``math.inf`` (all of them). In the loop they run at least one and for about
        ``budget_s`` on the loop's clock (a test's fake clock stands still: there all of
        them, the same in every run), in slices between the loop's other work: at 1,000
        nodes checking every reply before leasing again kept nodes waiting for seconds
        (bench/scale.py). One judged before its turn is checked by the judge itself."""
        if self.checker is not None:
            return self._prepare_beside(budget_s)
        end = self.clock() + budget_s
        while self._unprepared:
            c = self._unprepared.pop(next(iter(self._unprepared)))
            if c.standing:
                self.judge.prepare(c.lease.round, self.store.base(c.lease.base_version), c)
            if self.clock() > end:
                break
        return bool(self._unprepared)

    def _prepare_beside(self, budget_s: float) -> bool:
        assert self.checker is not None
        out = {id(c) for c, _ in self._checking.values()}
        for key, c in list(self._unprepared.items()):
            if key in out:
                continue
            if not c.standing:
                del self._unprepared[key]
                continue
            job = self.judge.plan(c.lease.round, c)
            digest = c.judged.update.arrays_digest if c.judged.update is not None else None
            if job.update is not None and digest is not None and self.blobs is not None \
                    and self.blobs.has(digest):  # the process reads it: no arrays pickled
                job = dataclasses.replace(job, update=None, update_digest=digest)
            self._checking[self.checker.submit(job, key=c.lease.nonce)] = (c, job)
        while True:  # (with budget_s inf: until every reply's checks are back)
            self._take_checks(0.0 if budget_s != math.inf else _CHECK_WAIT_S)
            if budget_s != math.inf or not self._checking or self.checker.dead:
                break
        if self.checker.dead:  # the loop checks from now on
            self.ledger.add_event("run", "the checker processes are gone: the run loop "
                                         "checks the replies itself")
            self.checker.close()
            self.checker = None
            if self.task_evals is not None:  # its checks train on the global RNGs, which a
                self.task_evals.beside = False  # judge thread saves and restores: no overlap
            return self._prepare(budget_s)
        return False

    def _take_checks(self, wait_s: float) -> None:
        """The checker's results in so far (waiting up to ``wait_s`` for a first one)."""
        assert self.checker is not None
        for jid, res in self.checker.results(wait_s):
            ahead = self._warming.pop(jid, None)
            if ahead is not None:  # a lease's base losses (the process keeps them)
                if res.error is None:
                    self.judge.scorer.remember(ahead, res)
                continue
            c, job = self._checking.pop(jid)
            self.judge.cost.checker_s = self.checker.busy_s
            if res.error is None:
                self.judge.apply(c, job, res)
            elif id(c) in self._unprepared:  # its checks here, as without the processes
                log.warning("a checker failed (%s): the loop checks the reply itself", res.error)
                self.judge.prepare(c.lease.round, self.store.base(c.lease.base_version), c)
            self._unprepared.pop(id(c), None)

    def _check_ahead(self, lease: Lease) -> None:
        """Start the base's side of a train lease's checks (``RoundJudge.plan_ahead``) in
        a checker process while its node trains."""
        if self.checker is None or lease.kind != Kind.TRAIN:
            return
        job = self.judge.plan_ahead(lease.round, lease)
        if job.first_batch is not None or job.held is not None:
            self._warming[self.checker.submit(job, key=lease.nonce)] = job

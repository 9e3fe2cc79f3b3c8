"""The run loop's lm-eval tasks: leased to a node beside a version's evaluation, judged beside
the loop, scores into the ledger.

With ``[eval] tasks`` set, the folder's log-likelihood tasks (``training.evals.answers``) are
packed once into a task bundle blob, and the run's tokenizer.json is put beside it. When a
version is evaluated and ``due`` (every ``tasks_every``-th version, and the last), one
eligible node, drawn with the run's RNG, gets a tasks lease queued behind its other work.
Its reply is screened as every reply is (``verify.reply``); once the lease is settled the
answers are judged on a thread (``verify.task_judge``: lm-eval scores them, a sample is
recomputed, a few seconds on a CPU) — in the loop itself when the run checks replies there
(``[verify] check_processes = 0``: the same verdicts in every run, as tests want) — and
``poll``, on the loop's thread, records the verdict —
credit like an evaluation, or the mismatch penalty — and, if it stands, the version's task
scores, in one transaction. A lease that fails, expires or whose answers are rejected goes to
another node (``MAX_TRIES`` nodes in all); after that the version has no node-measured
scores (an event says so), and ``atom-coordinator eval-tasks`` measures it on the
coordinator.

Without lm-eval on the coordinator, or with a folder that has no log-likelihood task, the run
goes on without tasks leases, and an event says why.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from protocol.blobstore import BlobDir
from protocol.errors import AtomError, Reason
from protocol.messages import Lease
from training import tokenizer as tk
from training.corpus import CorpusInfo
from training.evals.answers import leased_tasks
from training.evals.bundle import pack_tasks
from training.evals.harness import harness_name, require_harness
from training.evals.tasks import load_tasks

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.run.batches import TaskBatch
from coordinator.run.scheduler import Scheduler
from coordinator.verify.record import Judged, record_judged
from coordinator.verify.reply import Ruling
from coordinator.verify.round_judge import Candidate
from coordinator.verify.task_judge import TaskCheck, TaskJudge

__all__ = ["MAX_TRIES", "TaskEvals"]

log = logging.getLogger(__name__)

MAX_TRIES = 3  # nodes a version's tasks are leased to before the coordinator gives up


@dataclass
class TaskEvals:
    cfg: RunConfig
    ledger: Ledger
    scheduler: Scheduler
    judge: TaskJudge
    bundle: str  # the task bundle's digest
    rng: random.Random
    issuer: ReceiptIssuer | None = None
    beside: bool = True  # judge on a thread beside the loop (False: in ``settled``)
    _checks: list[tuple[TaskBatch, Candidate, Future[TaskCheck]]] = field(default_factory=list)
    _open: int = 0  # tasks batches sent and not yet settled
    _retries: list[TaskBatch] = field(default_factory=list)  # to lease to another node
    _versions: set[int] = field(default_factory=set)  # versions leased in this process
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="task judge"))

    @classmethod
    def open(cls, cfg: RunConfig, ledger: Ledger, scheduler: Scheduler, corpus: CorpusInfo,
             blobs: BlobDir, arch: dict[str, Any], block_size: int, rng: random.Random,
             issuer: ReceiptIssuer | None = None) -> TaskEvals | None:
        """The tasks of ``[eval] tasks``, their bundle and the tokenizer put in ``blobs``; None
        (and an event saying why) when nodes cannot run them."""
        folder = cfg.eval_tasks()
        if folder is None:
            return None
        try:
            require_harness()
            tasks = leased_tasks(load_tasks(folder))
            if not tasks:
                raise AtomError(f"{folder} holds no log-likelihood task (multiple_choice, "
                                "loglikelihood, loglikelihood_rolling)")
            bundle = blobs.put(pack_tasks(tasks))
            text = (corpus.tokenizer_path.read_text() if corpus.tokenizer_sha256
                    else tk.byte_tokenizer_json())
            if tk.sha256_text(text) != corpus.tokenizer_digest:
                raise AtomError("the run's tokenizer.json changed since init")
            blobs.put(text.encode(), corpus.tokenizer_digest)
            # the text just checked, wrapped as the node wraps its blob (no second read)
            tokenizer = tk.wrap_tokenizer(tk.parse_tokenizer(text, "the run's tokenizer"),
                                          model_max_length=block_size)
        except (AtomError, OSError) as err:
            ledger.add_event("run", f"no lm-eval tasks in eval leases: {err}")
            return None
        judge = TaskJudge(tasks, tokenizer, arch, cfg.eval.tasks_check_docs,
                          cfg.verify.eval_tolerance, cfg.train.batch_size)
        log.info("lm-eval tasks %s go to nodes as bundle %s", [t.name for t in tasks], bundle)
        return cls(cfg, ledger, scheduler, judge, bundle, rng, issuer,
                   beside=cfg.verify.check_processes > 0)

    @property
    def out(self) -> bool:
        """A tasks lease is out (not yet answered, failed or expired), or due again."""
        return self._open > 0 or bool(self._retries)

    def due(self, version: int, round: int) -> bool:
        """Whether ``version`` (made in ``round``) gets a tasks lease: every ``tasks_every``-th,
        and the run's last."""
        every, last = self.cfg.eval.tasks_every, self.cfg.run.rounds
        return (every > 0 and version % every == 0) or round >= last or version >= last

    def lease(self, round: int, version: int, digest: str, node_ids: list[int],
              base: dict[str, Any], tried: Sequence[int] = ()
              ) -> tuple[int, Lease, TaskBatch] | None:
        """A tasks lease of ``version`` for one of ``node_ids`` not ``tried`` yet (drawn at
        random), or None."""
        free = sorted(set(node_ids) - set(tried))
        if not free:
            self.ledger.add_event("tasks", f"version {version}: no node to run the lm-eval "
                                           "tasks" + (" (again)" if tried else ""))
            return None
        node = self.rng.choice(free)
        lease = self.scheduler.lease_tasks(round, node, version, digest, self.bundle,
                                           len(self.judge.tasks), self.cfg.eval.tasks_deadline_s)
        self._open += 1
        self._versions.add(version)
        return node, lease, TaskBatch("tasks", version, base=base, digest=digest, round=round,
                                      tried=[*tried, node])

    def more(self, node_ids: Callable[[], list[int]],
             last: Callable[[], tuple[int, int, str, dict[str, Any]]] | None = None
             ) -> list[tuple[int, Lease, TaskBatch]]:
        """The tasks leases due beyond the evaluations': each version whose last try failed,
        to a node of ``node_ids()`` that has not had it; and, at the run's end, the ``last()``
        version ``(round, version, digest, arrays)`` if it had none since this loop started
        and has no scores (its round accepted nothing, so it was made and evaluated a round
        earlier; or a restart lost its lease)."""
        retries, self._retries = self._retries, []
        final = last() if last is not None else None
        if final is not None and (final[1] in self._versions
                                  or self.ledger.task_scores(final[1])):
            final = None
        if not retries and final is None:
            return []
        ids = node_ids()
        got = [self.lease(b.round, b.version, b.digest, ids, b.base, b.tried) for b in retries]
        if final is not None:
            got.append(self.lease(*final[:3], ids, final[3]))
        return [g for g in got if g is not None]

    def settled(self, batch: TaskBatch) -> None:
        """The batch's lease is answered, failed or expired: judge what came back beside the
        loop."""
        self._open -= 1
        for lease in batch.screened_out:  # rejected when screened, recorded then
            self.scheduler.answered(lease, False)
        if not batch.cands:
            self._again(batch, "got no answer that passed screening")
            return
        c = batch.cands[0]
        assert c.judged.update is not None
        seed = self.rng.getrandbits(63)  # drawn here: the run's RNG stays on the loop's thread
        args = (batch.base, c.arrays, c.judged.update.metrics.tokens, seed)
        if not self.beside:
            self._record(batch, c, self._checked(lambda: self.judge.check(*args)))
            return
        self._checks.append((batch, c, self._pool.submit(self.judge.check, *args)))

    def poll(self, wait: bool = False) -> None:
        """Record the verdicts whose checks are done (all of them, with ``wait``)."""
        for item in list(self._checks):
            batch, c, fut = item
            if not (wait or fut.done()):
                continue
            self._checks.remove(item)
            self._record(batch, c, self._checked(fut.result))

    @staticmethod
    def _checked(check: Callable[[], TaskCheck]) -> TaskCheck:
        try:
            return check()
        except Exception as err:  # the coordinator's fault, not the node's: no penalty
            log.exception("judging a tasks reply failed")
            line = (str(err).splitlines() or [type(err).__name__])[0]
            return TaskCheck(Reason.MALFORMED, f"the coordinator could not judge the answers: "
                                               f"{line[:200]}")

    def finish(self) -> None:
        """Wait for every judgement still running and record it (the run's end)."""
        self.poll(wait=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _record(self, batch: TaskBatch, c: Candidate, check: TaskCheck) -> None:
        verdict = (Ruling(True, None, f"accepted ({check.detail})") if check.accepted
                   else Ruling(False, check.reason, check.detail))
        with self.ledger.atomic("close a task evaluation"):
            row = record_judged(Judged(verdict, c.judged.update, c.arrays), lease=c.lease,
                                lease_row_id=c.lease_row_id, node_id=c.node.id,
                                node_name=c.node.name, cfg=self.cfg, ledger=self.ledger,
                                now=c.received_at, issuer=self.issuer)
            if check.accepted:
                self.ledger.record_task_scores(
                    batch.version, [s.to_dict() for s in check.scores],
                    harness=f"{harness_name()}, answers of {c.node.name} (update {row.id})")
        self.scheduler.answered(c.lease, check.accepted)
        if check.accepted:
            self.ledger.add_event("tasks", f"version {batch.version}: lm-eval scores from "
                                           f"{c.node.name}'s answers ({check.detail})",
                                  node_id=c.node.id)
        else:
            self._again(batch, f"answers of {c.node.name} rejected ({check.reason})")

    def _again(self, batch: TaskBatch, why: str) -> None:
        """Lease ``batch``'s tasks to another node, if it has not had ``MAX_TRIES``."""
        again = len(batch.tried) < MAX_TRIES
        self.ledger.add_event("tasks", f"version {batch.version}: the lm-eval tasks {why}; "
                              + ("leased to another node" if again else
                                 f"no scores from nodes after {len(batch.tried)} tries"))
        if again:
            self._retries.append(batch)

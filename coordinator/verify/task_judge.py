"""A tasks reply's answers are scored here, not taken from the node, and checked in part.

A node answering a tasks lease signs its answer to every lm-eval request of the bundle's
tasks (``training.evals.answers``); ``verify.reply`` has checked their shapes, signs and
total. ``TaskJudge.check`` then:

1. **scores the answers with lm-eval** (``score_answers``: the task code, seeds and
   aggregation of a direct run, fed the node's answers). Answers that are not exactly one
   per request of every task are ``shape_mismatch``; tokens that are not the requests'
   tokens ``metrics_inconsistent``;
2. **recomputes a sample**: ``[eval] tasks_check_docs`` documents per task, drawn with the
   run's unpredictable RNG, answered again by the coordinator's own copy of the version;
   every answer of those documents must agree (the log-likelihood within ``[verify]
   eval_tolerance`` of the recomputation, relative, or absolute below 1 nat; the greedy flag
   equal where a metric reads it (``answers.reads_greedy``: a ``loglikelihood`` task's
   ``acc``, a multiple-choice ``exact_match``; elsewhere a near-tie on another device would
   reject an honest node for a flag no score uses), or the reply is ``eval_mismatch`` and
   pays the mismatch penalty as a lying evaluation does. The recomputed documents are
   answered in the same lm-eval pass as the replay, on the requests the node was given
   (few-shot contexts included). Answers lm-eval cannot aggregate (an absurd log-likelihood
   overflowing a perplexity) are ``metrics_inconsistent``, once the sample has been judged.

A node that changes the answers of ``m`` of a task's ``n`` documents escapes ``k`` sampled
documents with chance about ``(1 - m/n)^k``; to move an accuracy by ``m/n`` it must lie on
that many documents. The check is pure computation (no ledger): the run loop runs it beside
its own work and records what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import Reason
from training.evals.answers import (
    PREFIX, AnswerMismatch, Recheck, Replayed, reads_greedy, score_answers,
)
from training.evals.harness import TaskScore
from training.evals.tasks import TaskFile

__all__ = ["TaskCheck", "TaskJudge"]


@dataclass(frozen=True)
class TaskCheck:
    """What ``TaskJudge.check`` found: the scores if the reply stands, else why not."""

    reason: str | None
    detail: str
    scores: tuple[TaskScore, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class TaskJudge:
    tasks: Sequence[TaskFile]
    tokenizer: Any  # the run's tokenizer as transformers wraps it
    arch: Mapping[str, Any]  # the model's, as checkpoints record it
    check_docs: int
    tolerance: float
    batch_size: int = 4

    def check(self, base: Mapping[str, np.ndarray], answers: Mapping[str, np.ndarray],
              tokens: int, seed: int) -> TaskCheck:
        """Judge ``answers`` (claiming ``tokens``) to the tasks on version ``base``; ``seed``
        draws the documents recomputed (drawn by the caller from the run's RNG)."""
        from training.hf_convert import to_transformers  # torch, transformers: only here

        model, spec = to_transformers(base, self.arch)
        recheck = Recheck(model, self.check_docs, seed, spec.block_size, self.batch_size)
        try:
            replayed = score_answers(self.tasks, answers, self.tokenizer, recheck)
        except AnswerMismatch as err:
            return TaskCheck(Reason.SHAPE_MISMATCH, str(err))
        if replayed.tokens != tokens:
            return TaskCheck(Reason.METRICS_INCONSISTENT,
                             f"reported {tokens} tokens, the requests take {replayed.tokens}")
        wrong = self._compare(answers, replayed)
        if wrong:
            return TaskCheck(Reason.EVAL_MISMATCH, wrong)
        checked = len({(t, doc) for t, got in replayed.rechecked.items() for doc, _ in got})
        if replayed.scores is None:  # lm-eval could not aggregate what the node answered
            return TaskCheck(Reason.METRICS_INCONSISTENT, "the answers could not be scored: "
                             f"{replayed.error}")
        return TaskCheck(None, f"scored with lm-eval; {checked} documents recomputed",
                         tuple(replayed.scores))

    def _compare(self, answers: Mapping[str, np.ndarray], replayed: Replayed) -> str:
        """'' if the node's answers to the rechecked documents agree with the coordinator's,
        else what is off."""
        greedy_read = {t.name for t in self.tasks if reads_greedy(t)}
        off, n = [], 0
        for task, got in sorted(replayed.rechecked.items()):
            row = {k: i for i, k in enumerate(replayed.keys[task])}
            claimed = answers[PREFIX + task]
            for key, (ll, greedy) in sorted(got.items()):
                n += 1
                c_ll, c_greedy = claimed[row[key]]
                flag_off = task in greedy_read and bool(c_greedy) != greedy
                if abs(c_ll - ll) > self.tolerance * max(abs(ll), 1.0) or flag_off:
                    off.append((task, key, c_ll, ll, bool(c_greedy), greedy))
        if not off:
            return ""
        task, (doc, idx), c_ll, ll, c_g, g = off[0]
        return (f"{len(off)} of {n} recomputed answers off, e.g. {task} document {doc} "
                f"request {idx}: claimed log-likelihood {c_ll:.4f}"
                f"{' (greedy)' if c_g else ''}, recomputed {ll:.4f}{' (greedy)' if g else ''}")

"""A train reply's own checks as data: what to compute (``CheckJob``) and the computing.

``RoundJudge`` decides what each reply is checked on — its lease's first batch for the base
check, a held-out draw and a draw of its own shard for the usefulness scores (random
offsets: the judge's RNG, so the run is reproducible) — and ``Scorer`` computes the losses.
The split lets the forward passes run where there is a free core (``verify.checker``: a
process beside the run loop) while every decision stays in the loop. A job names tokens
by corpus offsets and the base version by its digest, so it is small and any process that
can read the run's corpus and blob store can run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from training.evaluate import evaluate_model
from training.families import ModelSpec
from training.inner import first_batch_loss
from training.state import arrays_to_model, load_arrays

__all__ = ["CheckJob", "CheckResult", "FirstBatch", "Scorer", "Span", "windows"]

Arrays = Mapping[str, np.ndarray]
_SCORE_BATCH_TOKENS = 8192  # tokens per forward pass when the coordinator scores an update
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class FirstBatch:
    """The first batch a lease trains on: the base's loss on it is the base check."""

    start: int
    end: int
    seed: int
    batch_size: int
    seq_len: int


@dataclass(frozen=True)
class Span:
    """``seq_len`` windows of the corpus at ``starts``, one draw: ``key`` names it (two
    draws never share a key, so a cached loss is always of the same tokens)."""

    key: int
    starts: tuple[int, ...]


@dataclass(frozen=True)
class CheckJob:
    """One reply's checks against its base version (``base_digest`` in the blob store)."""

    base_version: int
    base_digest: str
    first_batch: FirstBatch | None = None
    update: Arrays | None = None  # the pseudo-gradient, when scores are wanted
    held: Span | None = None  # held-out windows
    own: Span | None = None  # windows of the update's own shard (None: shard too short)
    # instead of ``update``: its encoded payload in the blob store, decoded where the job runs
    # (a job to a checker process then carries a digest, not the model-sized arrays)
    update_digest: str | None = None


@dataclass(frozen=True)
class CheckResult:
    base_loss: float | None = None  # the base on the first batch
    improvement: float | None = None  # held-out, nats
    shard_gain: float | None = None  # own shard, nats (inf: no window to score on)
    error: str | None = None  # the checks could not run here (the loop runs them itself)


def windows(tokens: np.ndarray, span: Span, seq_len: int) -> np.ndarray:
    """The span's windows laid end to end, plus one token, so ``evaluate`` scores each
    window once."""
    parts = [np.asarray(tokens[s:s + seq_len]) for s in span.starts]
    first = span.starts[0]
    return np.concatenate(parts + [np.asarray(tokens[first:first + 1])])


class Scorer:
    """Runs ``CheckJob``s. The base's losses (per first batch, per drawn span) are cached:
    a round's replies share the held-out draw, a spot check's two results their shard.

    ``base_of(version, digest)`` gives a base version's arrays; ``tokens`` is the corpus.
    """

    def __init__(self, spec: ModelSpec, tokens: np.ndarray, seq_len: int, batch_size: int,
                 base_of: Callable[[int, str], Arrays]) -> None:
        self.spec, self.tokens, self.seq_len = spec, tokens, seq_len
        # many windows per forward pass: the nodes' training batch (a few windows) made a
        # small model's scores a hundred small passes each; only the coordinator compares
        # these scores, so the batching (which moves the last float digits) is its own
        self.batch = max(batch_size, _SCORE_BATCH_TOKENS // seq_len)
        self.base_of = base_of
        self._base: dict[tuple, float] = {}  # (version, what) -> the base's loss
        self._built: torch.nn.Module | None = None

    def run(self, job: CheckJob) -> CheckResult:
        """The job's losses. Without an update (a lease just issued: ``plan_ahead``) only
        the base's, kept for the reply's job to find."""
        base = self.base_of(job.base_version, job.base_digest)
        base_loss = None if job.first_batch is None else self.first_batch(job, base)
        if job.update is None and job.held is not None:
            for span in (job.held, job.own):
                if span is not None:
                    self.base_span(job, base, span)
        if job.update is None or job.held is None:
            return CheckResult(base_loss)
        local = {k: np.asarray(base[k], np.float32) - job.update[k] for k in base}
        improvement = self.base_span(job, base, job.held) - self.loss(local, job.held)
        gain = math.inf if job.own is None else (
            self.base_span(job, base, job.own) - self.loss(local, job.own))
        return CheckResult(base_loss, improvement, gain)

    def first_batch(self, job: CheckJob, base: Arrays) -> float:
        fb = job.first_batch
        assert fb is not None
        key = (job.base_version, fb)
        if key not in self._base:
            self._base[key] = first_batch_loss(
                base, self.spec, np.asarray(self.tokens[fb.start:fb.end]),
                batch_size=fb.batch_size, seq_len=fb.seq_len, seed=fb.seed,
                model=self._model(base))
        return self._base[key]

    def base_span(self, job: CheckJob, base: Arrays, span: Span) -> float:
        key = (job.base_version, span.key)
        if key not in self._base:
            self._base[key] = self.loss(base, span)
        return self._base[key]

    def loss(self, arrays: Arrays, span: Span) -> float:
        return evaluate_model(self._model(arrays), windows(self.tokens, span, self.seq_len),
                              seq_len=self.seq_len, batch_size=self.batch,
                              device=_CPU).mean_loss

    def _model(self, arrays: Arrays) -> torch.nn.Module:
        """One model, refilled for every pass: building a small model cost as much as
        scoring 4,096 tokens with it (bench/scale.py)."""
        if self._built is None:
            self._built = arrays_to_model(arrays, self.spec, _CPU)
            return self._built
        return load_arrays(self._built, arrays)

    def remember(self, job: CheckJob, result: CheckResult) -> None:
        """Keep a base loss computed elsewhere (the judge's base check reads it)."""
        if job.first_batch is not None and result.base_loss is not None:
            self._base[(job.base_version, job.first_batch)] = result.base_loss

    def forget(self, keep_from: int) -> None:
        """Drop what was cached for base versions older than ``keep_from``."""
        self._base = {k: v for k, v in self._base.items() if k[0] >= keep_from}

"""The round-level verdict: what of a round's screened train replies is accepted.

Replies that pass ``verify.reply.verify`` as they arrive are held as ``Candidate``s, and
``RoundJudge.prepare`` does each one's own expensive work at once (the base check's forward
pass, the usefulness scores); when the round's replies are in (the asynchronous loop: an outer
step's buffer), ``RoundJudge.judge`` runs the rules of ``coordinator.verify.rules`` over them,
cheapest first (duplicates, adaptive norm bound, base check, spot checks, usefulness), then
records every verdict in the ledger and pays credit for the accepted ones. Every check runs
against the candidate's own base version (the lock-step loop's are all the same one).

Usefulness is scored on the *node's local model*, ``base - update`` (not on the outer step
``base - outer_lr * update``): it asks "did this work help" of the work itself, independent
of the outer optimizer's state. Each round draws one held-out batch (``usefulness_tokens``
in ``seq_len`` windows at random offsets of the validation range) and, per shard, a sample
of the same size from the shard the update was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.compression import decode, encode
from protocol.errors import Reason
from protocol.messages import Lease
from training.inner import train_inner
from training.families import ModelSpec

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger, Node
from coordinator.verify import rules
from coordinator.verify.record import Judged, Verdicted, record_many
from coordinator.verify.reply import Ruling
from coordinator.verify.scoring import CheckJob, CheckResult, FirstBatch, Scorer, Span

__all__ = ["Candidate", "RoundJudge", "VerifyCost"]

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
SPOT_CHECK_TOKENS = 4096  # shard tokens a spot check scores on when usefulness is off


@dataclass
class Candidate:
    """A train reply that passed ``verify``, waiting for the round's verdict."""

    judged: Judged
    lease: Lease
    lease_row_id: int
    node: Node
    received_at: float
    reason: str | None = None  # set by the first round rule that rejects it
    detail: str = ""
    improvement: float | None = None  # held-out, nats
    shard_gain: float | None = None  # on its own shard, nats
    notes: list[str] = field(default_factory=list)

    @property
    def standing(self) -> bool:
        return self.reason is None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return self.judged.arrays

    @property
    def norm(self) -> float:
        return float(self.judged.verdict.norm or 0.0)

    def reject(self, reason: str, detail: str) -> None:
        if self.reason is None:
            self.reason, self.detail = reason, detail


@dataclass
class VerifyCost:
    """Seconds spent verifying train replies, for the cost report (bench/byzantine.py)."""

    updates: int = 0  # train replies screened
    judged: int = 0  # of them, candidates for the round-level rules
    screen_s: float = 0.0  # verifier.verify as replies arrive
    round_s: float = 0.0  # the round-level rules, recomputations included
    checks_s: float = 0.0  # of round_s, the replies' own checks run in the loop (prepare)
    checker_s: float = 0.0  # replies' own checks run in checker processes (verify.checker)
    recomputes: int = 0
    recompute_s: float = 0.0
    train_wall_s: float = 0.0  # what the nodes reported training the candidates took

    @property
    def per_update_s(self) -> float:
        """Verification seconds per train reply."""
        return (self.screen_s + self.round_s) / max(self.updates, 1)

    @property
    def train_s_per_update(self) -> float:
        """Training seconds per candidate, as its node reported them."""
        return self.train_wall_s / max(self.judged, 1)


@dataclass
class _Draws:
    """One round's usefulness yardsticks for one base version: the held-out draw and, per
    shard, a draw of the shard (None: too short for a window)."""

    rnd: int
    held: Span | None
    shards: dict[int, Span | None] = field(default_factory=dict)


@dataclass
class RoundJudge:
    cfg: RunConfig
    ledger: Ledger
    spec: ModelSpec
    tokens: np.ndarray  # the whole corpus
    val_range: tuple[int, int]
    rng: random.Random
    issuer: ReceiptIssuer | None = None
    cost: VerifyCost = field(default_factory=VerifyCost)
    # the windows every score is on, by base version (the RNG draws them; a Scorer runs
    # the forward passes, here or in a checker process)
    _draws: dict[int, _Draws] = field(default_factory=dict)
    _keys: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.scorer = Scorer(self.spec, self.tokens, self.cfg.train.seq_len,
                             self.cfg.train.batch_size, self._base_of)
        self._bases: Mapping[int, Arrays] = {}

    def _base_of(self, version: int, digest: str) -> Arrays:
        return self._bases[version]

    def prepare(self, rnd: int, base: Arrays, c: Candidate) -> None:
        """Do a candidate's own expensive checks as it arrives — the base check's forward
        pass and its usefulness scores — so the round's verdict waits only for the last
        reply's (the others' are done while nodes still train or evaluate). ``base`` is the
        arrays of the candidate's base version."""
        t0 = time.perf_counter()
        job = self.plan(rnd, c)
        self.apply(c, job, self._run(job, {c.lease.base_version: base}))
        took = time.perf_counter() - t0
        self.cost.round_s += took
        self.cost.checks_s += took

    def plan(self, rnd: int, c: Candidate) -> CheckJob:
        """What ``c``'s own checks compute: its lease's first batch (the base check) and
        the windows of its usefulness scores (one held-out draw per round, one draw per
        shard: drawn by ``plan_ahead`` if it ran, or now)."""
        return self._plan(rnd, c.lease, c.arrays, score=c.improvement is None)

    def plan_ahead(self, rnd: int, lease: Lease) -> CheckJob:
        """The base's side of a train lease's checks, known once it is issued: the same
        first batch and windows ``plan`` will name for its reply, without an update. A
        checker process computes it while the node trains, so the reply's own checks are
        the local model's passes only (on the bench the round's last reply waited
        0.3-1.3 s for its checks, the nodes idle)."""
        return self._plan(rnd, lease, None, score=True)

    def _plan(self, rnd: int, x: Lease, update: Arrays | None, *, score: bool) -> CheckJob:
        v = self.cfg.verify
        first = FirstBatch(x.data_start, x.data_end, x.seed, x.batch_size, x.seq_len) \
            if v.base_loss_tolerance > 0 else None
        if v.usefulness_tokens <= 0 or not score:
            return CheckJob(x.base_version, x.base_digest, first)
        draws = self._draws.get(x.base_version)
        if draws is None or draws.rnd != rnd:
            # one held-out draw per round (a base version of it scores on the same windows)
            same = next((d for d in self._draws.values() if d.rnd == rnd), None)
            held = same.held if same is not None else self._draw(*self.val_range)
            if held is None:
                log.warning("validation range too short to score usefulness")
            draws = self._draws[x.base_version] = _Draws(rnd, held)
        if draws.held is None:
            return CheckJob(x.base_version, x.base_digest, first)
        if x.shard_id not in draws.shards:
            draws.shards[x.shard_id] = self._draw(x.data_start, x.data_end)
        return CheckJob(x.base_version, x.base_digest, first, update, draws.held,
                        draws.shards[x.shard_id])

    def apply(self, c: Candidate, job: CheckJob, result: CheckResult) -> None:
        """Take the results of ``c``'s checks (run here or in a checker process)."""
        self.scorer.remember(job, result)
        if result.improvement is not None:
            c.improvement, c.shard_gain = result.improvement, result.shard_gain

    def _run(self, job: CheckJob, bases: Mapping[int, Arrays]) -> CheckResult:
        self._bases = bases
        try:
            return self.scorer.run(job)
        finally:
            self._bases = {}

    def _draw(self, lo: int, hi: int, n_tokens: int | None = None) -> Span | None:
        """About ``n_tokens`` (``usefulness_tokens``) tokens as ``seq_len`` windows at random
        offsets of [lo, hi); None if the range holds no window."""
        seq = self.cfg.train.seq_len
        if hi - lo < seq + 1:
            return None
        n = max(1, math.ceil((n_tokens or self.cfg.verify.usefulness_tokens) / seq))
        return Span(next(self._keys), tuple(self.rng.randrange(lo, hi - seq) for _ in range(n)))

    def judge(self, rnd: int, bases: Mapping[int, Arrays], cands: Sequence[Candidate],
              pairs: Sequence[tuple[int, int]]) -> None:
        """Give every candidate (in arrival order) its verdict and record it; ``bases`` maps
        each candidate's base version to its arrays; ``pairs`` are index pairs (original,
        copy) of spot-checked shards (the two share a base)."""
        t0 = time.perf_counter()
        v = self.cfg.verify
        if v.reject_duplicates:
            digests = [c.judged.update.arrays_digest for c in cands]
            seen = self.ledger.accepted_with_digests(digests)
            self._apply(cands, range(len(cands)), Reason.DUPLICATE, rules.duplicates(
                digests, [c.node.id for c in cands], {frozenset(p) for p in pairs},
                lambda d: None if (row := seen.get(d)) is None
                else f"update {row.id} of node {row.node_id}, accepted before"))
        live = [i for i, c in enumerate(cands) if c.standing]
        self._apply(cands, live, Reason.NORM_BOUND,
                    rules.norm_outliers([cands[i].norm for i in live], v.norm_factor))
        if v.base_loss_tolerance > 0:
            self._base_check(bases, cands)
        for a, b in pairs:
            self._spot_check(rnd, bases[cands[a].lease.base_version], cands[a], cands[b])
        if v.usefulness_tokens > 0:
            self._usefulness(rnd, bases, cands)
        # done with this round's draws; a later round's, drawn ahead as its leases went
        # out (the asynchronous loop), stay
        self._draws = {k: d for k, d in self._draws.items() if d.rnd > rnd}
        self.scorer.forget(min(bases, default=0))
        took = time.perf_counter() - t0
        self.cost.round_s += took
        log.info("round %d: %d train results judged in %.2f s", rnd, len(cands), took)
        self.cost.judged += len(cands)
        for c in cands:
            self.cost.train_wall_s += float(c.judged.update.metrics.wall_s)
        record_many([self._verdicted(c) for c in cands], cfg=self.cfg, ledger=self.ledger,
                    issuer=self.issuer)

    # -- rules --------------------------------------------------------------------------

    @staticmethod
    def _apply(cands: Sequence[Candidate], idx: Sequence[int], reason: str,
               rejected: Mapping[int, str]) -> None:
        for k, detail in rejected.items():
            cands[idx[k]].reject(reason, detail)

    def _base_loss(self, base: Arrays, x: Lease) -> float:
        """The base's loss on the lease's first batch; one forward pass per shard of a round
        (a spot check's two results share it)."""
        job = CheckJob(x.base_version, x.base_digest,
                       FirstBatch(x.data_start, x.data_end, x.seed, x.batch_size, x.seq_len))
        self._bases = {x.base_version: base}
        try:
            return self.scorer.first_batch(job, base)
        finally:
            self._bases = {}

    def _base_check(self, bases: Mapping[int, Arrays], cands: Sequence[Candidate]) -> None:
        live = [i for i, c in enumerate(cands) if c.standing]
        self._apply(cands, live, Reason.BASE_MISMATCH, rules.base_mismatch(
            [float(cands[i].judged.update.metrics.loss_before) for i in live],
            [self._base_loss(bases[cands[i].lease.base_version], cands[i].lease)
             for i in live],
            self.cfg.verify.base_loss_tolerance))

    def _spot_check(self, rnd: int, base: Arrays, a: Candidate, b: Candidate) -> None:
        lease = a.lease
        where = f"round {rnd} shard {lease.shard_id}: {a.node.name} and {b.node.name}"
        if not (a.standing and b.standing):
            self.ledger.add_event("spot_check", f"{where}: only one result left to compare")
            return
        v = self.cfg.verify

        @functools.cache
        def shard() -> Span | None:  # drawn only if the results disagree
            return self._draw(lease.data_start, lease.data_end,
                              v.usefulness_tokens or SPOT_CHECK_TOKENS)

        def score(update: Arrays) -> float:  # NaN (never within tolerance) if no window
            span = shard()
            return math.nan if span is None else self.scorer.loss(_local(base, update), span)

        out = rules.spot_check(a.arrays, b.arrays, v.spot_check_tolerance,
                               lambda: self._recompute(base, lease), score,
                               v.spot_check_loss_tolerance)
        pair = (a, b)
        for i, c in enumerate(pair):
            other = pair[1 - i]
            if i in out.losers:
                c.reject(Reason.SPOT_CHECK_MISMATCH,
                         f"spot check with {other.node.name}: {out.detail}")
            else:
                c.notes.append(f"spot check with {other.node.name}: {out.detail}")
        lost = ", ".join(pair[i].node.name for i in out.losers)
        self.ledger.add_event("spot_check", f"{where} {out.detail}"
                                            + (f"; rejected: {lost}" if lost else ""))

    def _recompute(self, base: Arrays, lease: Lease) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        res = train_inner(base, self.spec, np.asarray(self.tokens[lease.data_start:lease.data_end]),
                          steps=lease.inner_steps, batch_size=lease.batch_size,
                          seq_len=lease.seq_len, lr=lease.lr, weight_decay=lease.weight_decay,
                          seed=lease.seed, device="cpu")
        self.cost.recomputes += 1
        self.cost.recompute_s += time.perf_counter() - t0
        # through the run's encoding, as an honest node would send it (int8 is deterministic:
        # an honest CPU node's update decodes to exactly this)
        codec = self.cfg.codec()
        shapes = {k: (tuple(a.shape), "<f4") for k, a in res.pseudo_grad.items()}
        return decode(encode(res.pseudo_grad, codec), codec, shapes, math.inf)

    def _score(self, rnd: int, base: Arrays, c: Candidate) -> None:
        """``c.improvement`` (held-out) and ``c.shard_gain`` (own shard), once."""
        if c.improvement is None:
            job = dataclasses.replace(self.plan(rnd, c), first_batch=None)
            self.apply(c, job, self._run(job, {c.lease.base_version: base}))

    def _usefulness(self, rnd: int, bases: Mapping[int, Arrays],
                    cands: Sequence[Candidate]) -> None:
        for c in cands:
            if c.standing:
                self._score(rnd, bases[c.lease.base_version], c)
        live = [c for c in cands if c.standing and c.improvement is not None]
        if not live:
            return
        v = self.cfg.verify
        found = rules.not_useful([c.improvement for c in live], [c.shard_gain for c in live],
                                 tolerance=v.usefulness_tolerance,
                                 min_improvement=v.min_improvement,
                                 min_fraction=v.min_improvement_fraction)
        for k, detail in found.items():
            live[k].reject(Reason.NOT_USEFUL, detail)

    # -- recording ----------------------------------------------------------------------

    def _verdicted(self, c: Candidate) -> Verdicted:
        norm = c.judged.verdict.norm
        if c.standing:
            parts = [f"norm {c.norm:.4g}"]
            if c.improvement is not None and c.shard_gain is not None:
                parts.append(f"held-out {c.improvement:+.3g}, own shard {c.shard_gain:+.3g} nats")
            verdict = Ruling(True, None, f"accepted ({'; '.join(parts + c.notes)})", norm)
        else:
            verdict = Ruling(False, c.reason, c.detail, norm)
        # scored on arrival; recorded for what reached the usefulness rule, as before
        scored = c.standing or c.reason == Reason.NOT_USEFUL
        improvement = c.improvement if scored and c.improvement is not None and math.isfinite(
            c.improvement) else None
        return Verdicted(Judged(verdict, c.judged.update, c.arrays), c.lease, c.lease_row_id,
                         c.node.id, c.node.name, c.received_at, improvement)


def _local(base: Arrays, update: Arrays) -> dict[str, np.ndarray]:
    """The node's local model: base - update."""
    return {k: np.asarray(base[k], np.float32) - update[k] for k in base}

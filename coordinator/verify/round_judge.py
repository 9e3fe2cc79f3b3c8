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

import functools
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.compression import decode, encode
from protocol.errors import Reason
from protocol.messages import Lease
from training.evaluate import evaluate
from training.inner import first_batch_loss, train_inner
from training.families import ModelSpec

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger, Node
from coordinator.verify import rules
from coordinator.verify.record import Judged, Verdicted, record_many
from coordinator.verify.reply import Ruling

__all__ = ["Candidate", "RoundJudge", "VerifyCost"]

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
SPOT_CHECK_TOKENS = 4096  # shard tokens a spot check scores on when usefulness is off
_SCORE_BATCH_TOKENS = 8192  # tokens per forward pass when the coordinator scores an update


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
class _Scores:
    """One round's usefulness yardsticks for one base version: the held-out batch and the
    base's loss on it, and per shard a sample of it and the base's loss on that."""

    rnd: int
    held: np.ndarray | None
    base_held: float
    shards: dict[int, tuple[np.ndarray | None, float]] = field(default_factory=dict)


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
    _scores: dict[int, _Scores] = field(default_factory=dict)  # by base version
    _base_losses: dict[tuple[int, ...], float] = field(default_factory=dict)

    def prepare(self, rnd: int, base: Arrays, c: Candidate) -> None:
        """Do a candidate's own expensive checks as it arrives — the base check's forward
        pass and its usefulness scores — so the round's verdict waits only for the last
        reply's (the others' are done while nodes still train or evaluate). ``base`` is the
        arrays of the candidate's base version."""
        t0 = time.perf_counter()
        v = self.cfg.verify
        if v.base_loss_tolerance > 0:
            self._base_loss(base, c.lease)
        if v.usefulness_tokens > 0:
            self._score(rnd, base, c)
        self.cost.round_s += time.perf_counter() - t0

    def judge(self, rnd: int, bases: Mapping[int, Arrays], cands: Sequence[Candidate],
              pairs: Sequence[tuple[int, int]]) -> None:
        """Give every candidate (in arrival order) its verdict and record it; ``bases`` maps
        each candidate's base version to its arrays; ``pairs`` are index pairs (original,
        copy) of spot-checked shards (the two share a base)."""
        t0 = time.perf_counter()
        v = self.cfg.verify
        if v.reject_duplicates:
            self._apply(cands, range(len(cands)), Reason.DUPLICATE, rules.duplicates(
                [c.judged.update.arrays_digest for c in cands], [c.node.id for c in cands],
                {frozenset(p) for p in pairs}, self._accepted_before))
        live = [i for i, c in enumerate(cands) if c.standing]
        self._apply(cands, live, Reason.NORM_BOUND,
                    rules.norm_outliers([cands[i].norm for i in live], v.norm_factor))
        if v.base_loss_tolerance > 0:
            self._base_check(bases, cands)
        for a, b in pairs:
            self._spot_check(rnd, bases[cands[a].lease.base_version], cands[a], cands[b])
        if v.usefulness_tokens > 0:
            self._usefulness(rnd, bases, cands)
        self._scores.clear()
        self._base_losses.clear()
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

    def _accepted_before(self, digest: str) -> str | None:
        row = self.ledger.accepted_with_digest(digest)
        return None if row is None else f"update {row.id} of node {row.node_id}, accepted before"

    def _base_loss(self, base: Arrays, x: Lease) -> float:
        """The base's loss on the lease's first batch; one forward pass per shard of a round
        (a spot check's two results share it)."""
        key = (x.base_version, x.data_start, x.data_end, x.seed, x.batch_size, x.seq_len)
        if key not in self._base_losses:
            self._base_losses[key] = first_batch_loss(
                base, self.spec, np.asarray(self.tokens[x.data_start:x.data_end]),
                batch_size=x.batch_size, seq_len=x.seq_len, seed=x.seed)
        return self._base_losses[key]

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
        def shard() -> np.ndarray | None:  # drawn only if the results disagree
            return _windows(self.tokens, lease.data_start, lease.data_end,
                            v.usefulness_tokens or SPOT_CHECK_TOKENS, self.cfg.train.seq_len,
                            self.rng)

        def score(update: Arrays) -> float:  # NaN (never within tolerance) if no window
            windows = shard()
            return math.nan if windows is None else self._loss(_local(base, update), windows)

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
        if c.improvement is not None:
            return
        v, seq = self.cfg.verify, self.cfg.train.seq_len
        bv = c.lease.base_version
        scores = self._scores.get(bv)
        if scores is None or scores.rnd != rnd:
            # one held-out batch per round (a base version of it scores on the same batch)
            first = next((s for s in self._scores.values() if s.rnd == rnd), None)
            held = first.held if first is not None else _windows(
                self.tokens, *self.val_range, v.usefulness_tokens, seq, self.rng)
            if held is None:
                log.warning("validation range too short to score usefulness")
            scores = self._scores[bv] = _Scores(rnd, held, math.nan if held is None
                                                else self._loss(base, held))
        if scores.held is None:
            return
        key = c.lease.shard_id
        if key not in scores.shards:
            own = _windows(self.tokens, c.lease.data_start, c.lease.data_end,
                           v.usefulness_tokens, seq, self.rng)
            scores.shards[key] = (own, math.nan if own is None else self._loss(base, own))
        own, own_base = scores.shards[key]
        local = _local(base, c.arrays)
        c.improvement = scores.base_held - self._loss(local, scores.held)
        c.shard_gain = math.inf if own is None else own_base - self._loss(local, own)

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

    def _loss(self, arrays: Arrays, tokens: np.ndarray) -> float:
        # Many windows per forward pass: the nodes' training batch (a few windows) made a
        # small model's scores a hundred small passes each. Only the coordinator compares
        # these scores, so the batching (which moves the last float digits) is its own.
        seq = self.cfg.train.seq_len
        res = evaluate(arrays, self.spec, tokens, seq_len=seq,
                       batch_size=max(self.cfg.train.batch_size, _SCORE_BATCH_TOKENS // seq))
        return res.mean_loss

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


def _windows(tokens: np.ndarray, lo: int, hi: int, n_tokens: int, seq_len: int,
             rng: random.Random) -> np.ndarray | None:
    """About ``n_tokens`` tokens as ``seq_len`` windows at random offsets of [lo, hi), laid
    end to end (plus one token) so ``evaluate`` scores each window once; None if the range
    holds no window."""
    if hi - lo < seq_len + 1:
        return None
    n = max(1, math.ceil(n_tokens / seq_len))
    starts = [rng.randrange(lo, hi - seq_len) for _ in range(n)]
    parts = [np.asarray(tokens[s:s + seq_len]) for s in starts]
    return np.concatenate(parts + [np.asarray(tokens[starts[0]:starts[0] + 1])])

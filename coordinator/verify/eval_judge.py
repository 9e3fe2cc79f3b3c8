"""Evaluation replies are checked, not believed.

An eval reply commits, under the node's signature, to the loss sum of every window of its
range (``protocol.messages.EVAL_WINDOWS``); ``verifier.verify`` has already checked the
count and that the windows sum to the claimed total. ``EvalJudge.judge`` then, for the
replies of one eval phase:

1. **recomputes a sample** of each reply's windows (``[verify] eval_check_windows`` /
   ``eval_check_fraction``, drawn with the run's unpredictable RNG, so a node cannot know
   which windows will be looked at) and rejects the reply as ``eval_mismatch`` if any is off
   by more than ``eval_tolerance``;
2. **compares quorum pairs** (an eval range also leased to a node of another institution,
   ``eval_quorum_rate``): windows on which the two replies disagree are recomputed, and the
   side that is off from the recomputation is rejected;
3. records every verdict through ``verify.record.record_judged``, the one recording path (credit
   for the accepted, the ``mismatch_penalty`` for the lost, trust and probation follow from
   the reason).

What the published validation loss is made of is decided in ``validation_loss``: accepted
replies only, each range once, the coordinator's own evaluation for whatever no accepted
reply covers.

A liar on all windows, or on all of them by a few percent, is caught by the first sampled
window. A node that lies on ``m`` of ``n`` windows escapes ``k`` sampled ones with chance
about ``(1 - m/n)^k``, and moves the published number by about ``m/n`` of its lie: small
lies are cheap to tell and cheap to suffer; large ones are caught.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.errors import Reason
from protocol.messages import EVAL_WINDOWS, Lease
from training.evaluate import eval_windows, evaluate, window_losses
from training.families import ModelSpec
from training.state import arrays_to_model

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.verify.record import Judged, record_judged
from coordinator.verify.reply import Ruling
from coordinator.verify.round_judge import Candidate

__all__ = ["EvalJudge", "ValLoss", "agrees", "plan_quorum", "validation_loss"]

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


def agrees(claimed: float, reference: float, n_pred: int, tolerance: float) -> bool:
    """Whether a window's claimed loss sum agrees with ``reference`` over ``n_pred``
    predictions: mean losses within ``tolerance`` of the reference's (relative), or of 1 nat
    where the reference is below 1 nat (so near-zero windows are not judged to the bit)."""
    ref = reference / n_pred
    return abs(claimed - reference) / n_pred <= tolerance * max(ref, 1.0)


def plan_quorum(leases: Mapping[int, Sequence[Lease]], institution: Mapping[int, int],
                rate: float, rng: random.Random) -> list[tuple[Lease, int]]:
    """Pick the eval leases that also go to a second node: ``[(lease, node)]``.

    Each lease (node order, then lease order) is picked with chance ``rate`` and given to a
    random other node, of another institution where there is one (the nodes of one operator
    could agree on a lie), that has no copy yet this phase (one extra lease per node at most,
    so quorum never more than doubles anyone's eval work).
    """
    if rate <= 0:
        return []
    nodes = sorted(leases)
    taken: set[int] = set()
    out: list[tuple[Lease, int]] = []
    for owner in nodes:
        for lease in leases[owner]:
            if rng.random() >= rate:
                continue
            others = [n for n in nodes if n != owner and n not in taken]
            outside = [n for n in others if institution.get(n) != institution.get(owner)]
            pool = outside or others
            if not pool:
                continue
            checker = rng.choice(pool)
            taken.add(checker)
            out.append((lease, checker))
    return out


@dataclass(frozen=True)
class ValLoss:
    """A version's published validation loss and what it was made of."""

    loss: float | None
    tokens: int
    update_ids: tuple[int, ...]  # accepted eval updates whose windows it sums
    local_tokens: int  # tokens the coordinator evaluated itself (no accepted reply covered)


def validation_loss(cands: Sequence[Candidate], update_ids: Mapping[str, int],
                    val_range: tuple[int, int],
                    evaluate_range: Callable[[int, int], tuple[float, int]]) -> ValLoss:
    """Sum the accepted replies (each range once, originals before quorum copies, which
    come later in ``cands``) and ``evaluate_range(start, end) -> (loss_sum, tokens)`` the
    gaps; ``update_ids`` maps a lease nonce to its update row."""
    lo, hi = val_range
    covered = np.zeros(hi - lo, dtype=bool)
    loss_sum, count, used = 0.0, 0, []
    for c in cands:
        lease = c.lease
        if not c.standing or covered[lease.data_start - lo:lease.data_end - lo].any():
            continue
        covered[lease.data_start - lo:lease.data_end - lo] = True
        loss_sum += float(c.arrays[EVAL_WINDOWS].sum())
        count += int(c.judged.update.metrics.tokens)
        used.append(update_ids[lease.nonce])
    local = 0
    for start, end in _gaps(covered, lo):
        if end - start < 2:  # nothing to predict in a 1-token sliver
            continue
        part_sum, part_tokens = evaluate_range(start, end)
        loss_sum, count, local = loss_sum + part_sum, count + part_tokens, local + part_tokens
    return ValLoss(loss_sum / count if count else None, count, tuple(used), local)


@dataclass
class EvalJudge:
    cfg: RunConfig
    ledger: Ledger
    spec: ModelSpec
    tokens: np.ndarray  # the whole corpus
    rng: random.Random
    issuer: ReceiptIssuer | None = None
    recomputed: int = 0  # windows recomputed by the last ``judge``
    _cache: dict[tuple[int, int, int], float] = field(default_factory=dict)
    _built: Any = None  # the phase's base as a model (torch.nn.Module), built on first use

    def judge(self, base: Arrays, cands: Sequence[Candidate],
              pairs: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Give every eval candidate its verdict and record it; ``pairs`` are index pairs
        (original, quorum copy). Returns the recorded update id of each lease nonce."""
        self._cache.clear()
        self._built = None
        v = self.cfg.verify
        for c in cands:
            self._sample(base, c, v.eval_check_windows, v.eval_check_fraction)
        for a, b in pairs:
            self._quorum(base, cands[a], cands[b])
        self.recomputed = len(self._cache)
        ids = {}
        for c in cands:
            ids[c.lease.nonce] = self._record(c)
        return ids

    # -- rules --------------------------------------------------------------------------

    def _sample(self, base: Arrays, c: Candidate, count: int, fraction: float) -> None:
        n = len(c.arrays[EVAL_WINDOWS])
        k = min(n, max(count, math.ceil(fraction * n)))
        if k == 0:
            return
        picked = sorted(self.rng.sample(range(n), k))
        bad = self._check(base, c, picked)
        where = "" if bad else f"; largest gap {100 * self._largest_gap(base, c, picked):.2g}%"
        c.notes.append(f"{k} of {n} windows recomputed{where}")
        if bad:
            c.reject(Reason.EVAL_MISMATCH, f"recomputed {bad}")

    def _quorum(self, base: Arrays, a: Candidate, b: Candidate) -> None:
        pair = f"{a.node.name} and {b.node.name}"
        where = f"eval shard {a.lease.shard_id} [{a.lease.data_start}, {a.lease.data_end})"
        if not (a.standing and b.standing):
            self.ledger.add_event("quorum", f"{where}: {pair}, only one result left to compare")
            return
        wa, wb = a.arrays[EVAL_WINDOWS], b.arrays[EVAL_WINDOWS]
        n_pred = self._n_pred(a.lease)
        tol = self.cfg.verify.eval_tolerance
        differ = [i for i in range(len(wa))
                  if not agrees(wa[i], wb[i], n_pred[i], tol)
                  or not agrees(wb[i], wa[i], n_pred[i], tol)]
        if not differ:
            for c, other in ((a, b), (b, a)):
                c.notes.append(f"quorum with {other.node.name}: all {len(wa)} windows agree")
            self.ledger.add_event("quorum", f"{where}: {pair} agree on all {len(wa)} windows")
            return
        lost = []
        for c, other in ((a, b), (b, a)):
            bad = self._check(base, c, differ)
            if bad:
                c.reject(Reason.EVAL_MISMATCH, f"quorum with {other.node.name}, {bad}")
                lost.append(c.node.name)
            else:
                c.notes.append(f"quorum with {other.node.name}: {len(differ)} disagreeing "
                               "windows recomputed, this side right")
        self.ledger.add_event("quorum", f"{where}: {pair} disagree on {len(differ)} windows; "
                                        f"recomputed; rejected: {', '.join(lost) or 'none'}")

    def _check(self, base: Arrays, c: Candidate, windows: Sequence[int]) -> str:
        """'' if the reply's ``windows`` agree with the recomputation, else what is off."""
        claimed = c.arrays[EVAL_WINDOWS]
        truth = self._recompute(base, c.lease, windows)
        n_pred = self._n_pred(c.lease)
        tol = self.cfg.verify.eval_tolerance
        wrong = [(i, t) for i, t in zip(windows, truth)
                 if not agrees(claimed[i], t, n_pred[i], tol)]
        if not wrong:
            return ""
        i, t = wrong[0]
        return (f"{len(wrong)} of {len(windows)} checked windows off, e.g. window {i}: "
                f"claimed {claimed[i] / n_pred[i]:.4f} nats/token, recomputed "
                f"{t / n_pred[i]:.4f} (tolerance {tol:.1%})")

    def _largest_gap(self, base: Arrays, c: Candidate, windows: Sequence[int]) -> float:
        claimed = c.arrays[EVAL_WINDOWS]
        truth = self._recompute(base, c.lease, windows)
        return max(abs(claimed[i] - t) / max(t, 1e-12) for i, t in zip(windows, truth))

    def _recompute(self, base: Arrays, lease: Lease, windows: Sequence[int]) -> list[float]:
        """The coordinator's own loss sums of ``windows`` of the lease's range (cached per
        phase: a quorum pair's two replies share them)."""
        key = (lease.data_start, lease.data_end)
        todo = sorted({i for i in windows if (*key, i) not in self._cache})
        if todo:
            if self._built is None:  # once per phase: building it cost as much as the
                self._built = arrays_to_model(base, self.spec)  # passes (a third each)
            sums = window_losses(base, self.spec, np.asarray(self.tokens[slice(*key)]), todo,
                                 seq_len=lease.seq_len, model=self._built)
            self._cache.update({(*key, i): float(s) for i, s in zip(todo, sums)})
        return [self._cache[(*key, i)] for i in windows]

    @staticmethod
    def _n_pred(lease: Lease) -> list[int]:
        return [e - s - 1 for s, e in eval_windows(lease.data_end - lease.data_start,
                                                   lease.seq_len)]

    # -- recording ----------------------------------------------------------------------

    def _record(self, c: Candidate) -> int:
        if c.standing:
            verdict = Ruling(True, None, f"accepted ({'; '.join(c.notes) or 'not checked'})",
                              None)
        else:
            verdict = Ruling(False, c.reason, c.detail, None)
        row = record_judged(Judged(verdict, c.judged.update, c.arrays), lease=c.lease,
                            lease_row_id=c.lease_row_id, node_id=c.node.id,
                            node_name=c.node.name, cfg=self.cfg, ledger=self.ledger,
                            now=c.received_at, issuer=self.issuer)
        assert row.id is not None
        return row.id

    def evaluate_range(self, base: Arrays, start: int, end: int) -> tuple[float, int]:
        """(loss sum, tokens) of the coordinator's own evaluation of [start, end)."""
        t = self.cfg.train
        res = evaluate(base, self.spec, np.asarray(self.tokens[start:end]), seq_len=t.seq_len,
                       batch_size=t.batch_size)
        return res.loss_sum, res.tokens


def _gaps(covered: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """Maximal runs of False in ``covered`` as absolute (start, end) ranges."""
    edges = np.diff(np.concatenate(([1], covered.astype(np.int8), [1])))
    starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
    return [(offset + int(s), offset + int(e)) for s, e in zip(starts, ends)]

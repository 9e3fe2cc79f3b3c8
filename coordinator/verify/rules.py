"""Round-level verification rules: judged over all of a round's candidate updates at once.

``verifier.verify`` checks each reply on its own as it arrives; what passes is a *candidate*.
Once the round's replies are in, ``coordinator.verify.round_judge`` runs these rules over the
candidates, cheapest first; each returns ``{candidate index: detail}`` of the ones it rejects,
for the ``protocol.errors.Reason`` below. They are pure functions of numbers and arrays, so
each is unit-tested on hand-made updates::

    duplicate            same arrays digest as an earlier candidate of another node this round
                         (the first received is kept) or as an update accepted in an earlier
                         round; the two results of one spot check are exempt from each other
    norm_bound           L2 norm above ``factor`` x the round's median norm or below the median
                         over ``factor`` (only with 3+ candidates: with two, neither is "typical")
    base_mismatch        the ``loss_before`` a node reports (its starting model on the first
                         batch its seed draws) differs by more than the tolerance from the
                         coordinator's loss of the lease's base on that batch: the work did not
                         start from the base it is signed for (a stale model)
    spot_check_mismatch  two results of the same shard differ by more than the tolerance
                         (relative L2); a result loses unless it is close to the coordinator's
                         own recomputation, in parameters or in its loss on the shard
    not_useful           the local model (base - update) is worse on held-out data than the
                         base (or than the round's typical update, if that is worse) by more
                         than the tolerance, or barely better than the base on the update's
                         own shard (a free rider: zero or token update, full claim)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SpotCheck", "base_mismatch", "duplicates", "l2_norm", "norm_outliers", "not_useful",
           "rel_l2", "spot_check"]

Arrays = Mapping[str, np.ndarray]


def l2_norm(arrays: Arrays) -> float:
    """L2 norm over all arrays together, in float64."""
    return math.sqrt(sum(float(np.dot(a.reshape(-1).astype(np.float64),
                                      a.reshape(-1).astype(np.float64))) for a in arrays.values()))


def rel_l2(a: Arrays, b: Arrays) -> float:
    """``|a - b| / max(|a|, |b|)`` over all arrays: 0 for equal updates, 1 for an update
    against zero, at most 2. Arrays of ``a`` missing from ``b`` count as zeros."""
    diff = {k: np.asarray(a[k], np.float64) - np.asarray(b.get(k, 0.0), np.float64) for k in a}
    scale = max(l2_norm(a), l2_norm(b))
    return 0.0 if scale == 0 else l2_norm(diff) / scale


def duplicates(digests: Sequence[str], nodes: Sequence[int],
               same_work: Collection[frozenset[int]],
               accepted_before: Callable[[str], str | None] = lambda d: None) -> dict[int, str]:
    """Candidates (in arrival order) whose arrays digest repeats: one seen earlier this round
    from another node — unless the pair is a spot check (``same_work``), whose results are
    meant to be equal — or one ``accepted_before`` describes (returns None if unseen)."""
    out: dict[int, str] = {}
    first: dict[str, int] = {}
    for i, digest in enumerate(digests):
        earlier = accepted_before(digest)
        if earlier is not None:
            out[i] = f"same arrays as {earlier}"
            continue
        j = first.setdefault(digest, i)
        if j != i and nodes[j] != nodes[i] and frozenset((i, j)) not in same_work:
            out[i] = f"same arrays as node {nodes[j]}'s update this round, received first"
    return out


def norm_outliers(norms: Sequence[float], factor: float) -> dict[int, str]:
    """Norms above ``factor`` x the median or below median / ``factor``; off (empty) for
    ``factor`` 0 or fewer than 3 candidates."""
    if factor <= 0 or len(norms) < 3:
        return {}
    median = float(np.median(norms))
    out = {}
    for i, n in enumerate(norms):
        if n > factor * median:
            out[i] = f"update norm {n:.4g} exceeds {factor:g} x the round's median {median:.4g}"
        elif n * factor < median:
            out[i] = f"update norm {n:.4g} is below the round's median {median:.4g} / {factor:g}"
    return out


def base_mismatch(reported: Sequence[float], measured: Sequence[float],
                  tolerance: float) -> dict[int, str]:
    """Candidates whose reported first-batch loss is further than ``tolerance`` nats from the
    coordinator's (NaN is never within); off (empty) for ``tolerance`` 0."""
    if tolerance <= 0:
        return {}
    out = {}
    for i, (r, m) in enumerate(zip(reported, measured, strict=True)):
        if not abs(r - m) <= tolerance:
            out[i] = (f"reports loss {r:.4f} on its first batch, but the lease's base scores "
                      f"{m:.4f} there (tolerance {tolerance:g} nats): not trained from that base")
    return out


def _upper_median(xs: Sequence[float]) -> float:
    return float(sorted(xs)[len(xs) // 2])


@dataclass(frozen=True)
class SpotCheck:
    """Outcome of comparing two results of one shard: ``losers`` holds 0 (first), 1
    (second), both or neither; ``recomputed`` says whether the coordinator retrained it."""

    distance: float  # rel L2 between the two results
    losers: tuple[int, ...]
    recomputed: bool
    detail: str


def spot_check(a: Arrays, b: Arrays, tolerance: float, recompute: Callable[[], Arrays],
               score: Callable[[Arrays], float] | None = None,
               loss_tolerance: float = 0.0) -> SpotCheck:
    """Compare two results of the same work. Within ``tolerance`` (relative L2) both stand.
    Otherwise the coordinator's own result (``recompute()``) decides: a result stands if it
    is within ``tolerance`` of it, or — with a ``score`` (the loss a result's local model
    has on the shard) — if it scores within ``loss_tolerance`` nats of it. The second test
    is there for training that diverges numerically, not in substance: from a young model,
    bf16 and fp32 runs of the same shard end up far apart in parameters (relative L2 up to
    ~0.3 measured) but at the same loss (within ~0.01 nats), while three quarters of the
    steps end up 0.035+ nats worse. Results that stand neither way lose."""
    d = rel_l2(a, b)
    if d <= tolerance:
        return SpotCheck(d, (), False, f"agree (rel L2 {d:.2g})")
    ref = recompute()
    dist = (rel_l2(a, ref), rel_l2(b, ref))
    gaps: tuple[float, ...] = ()
    if score is not None and loss_tolerance > 0:
        ref_loss = score(ref)
        gaps = tuple(score(x) - ref_loss for x in (a, b))
    losers = tuple(i for i in (0, 1) if dist[i] > tolerance
                   and not (gaps and abs(gaps[i]) <= loss_tolerance))
    detail = (f"differ by rel L2 {d:.2g} > {tolerance:g}; against the coordinator's "
              f"recomputation {dist[0]:.2g} and {dist[1]:.2g}")
    if gaps:
        detail += f", shard loss {gaps[0]:+.3g} and {gaps[1]:+.3g} nats"
    return SpotCheck(d, losers, True, detail)


def not_useful(held_out: Sequence[float], own_shard: Sequence[float], *, tolerance: float,
               min_improvement: float, min_fraction: float) -> dict[int, str]:
    """Usefulness, from each candidate's improvements (loss of base minus loss of
    base - update, in nats) on the round's held-out batch and on its own shard.

    Held out: rejected below ``min(0, median) - tolerance`` — worse than the base by more
    than ``tolerance``, or, in a round where the typical update is itself worse on held-out
    data (local models drift from the average), worse than the typical one by that much.
    Own shard: rejected below ``max(min_improvement, min_fraction * median)``: training on a
    shard lowers the loss on it, so an update that does not did not do the work claimed.
    Of an even count the median is the upper one: of two updates, the better one is the
    reference, so a bad one cannot drag the bar down to meet it halfway.
    """
    out: dict[int, str] = {}
    if not held_out:
        return out
    # a model broken into NaN scores as infinitely bad, and cannot drag a median to NaN
    held_out = [h if math.isfinite(h) else -math.inf for h in held_out]
    own_shard = [w if math.isfinite(w) else -math.inf for w in own_shard]
    floor = min(0.0, _upper_median(held_out)) - tolerance
    need = max(min_improvement, min_fraction * _upper_median(own_shard))
    for i, (h, w) in enumerate(zip(held_out, own_shard)):
        if h < floor or h == -math.inf:
            out[i] = f"held-out loss change {-h:+.3g} nats, worse than the allowed {-floor:+.3g}"
        elif w < need or w == -math.inf:
            out[i] = (f"lowers the loss on its own shard by {w:.3g} nats, less than the "
                      f"{need:.3g} required of the work claimed")
    return out

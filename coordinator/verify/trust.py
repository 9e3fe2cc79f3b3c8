"""How much the coordinator trusts a node, from its record, and what that changes.

A node's trust is the mean of a Beta posterior over "its next train update is good":
``Beta(accepted + 1, rejected + (MISMATCH_WEIGHT - 1) * mismatches + 1)``, counted over its
train updates (eval answers are cheap to get accepted, so they build no trust) and its lost
checks. A lost check (``Reason.MISMATCHES``: a spot check, or an eval reply whose windows the
coordinator recomputed and found false) weighs ``MISMATCH_WEIGHT`` rejections: it is the
rejection that proves the node sent work it did not do. A new node starts at 0.5.

Trust raises a node's spot-check rate (``spot_check_rate``) and, with ``[verify]
trust_weighting``, scales its aggregation weight. A lost check also puts the node on
probation: every shard checked for its next ``PROBATION_UPDATES`` train updates.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence

__all__ = ["MISMATCH_WEIGHT", "NEW_NODE_TRUST", "PROBATION_UPDATES", "pick_checker",
           "plan_spot_checks", "spot_check_rate", "trust_score"]

MISMATCH_WEIGHT = 5.0
NEW_NODE_TRUST = 0.5
# A node that lost a spot check has every shard checked until its last this-many train
# updates that count (accepted, or lost a check) hold no lost check: a cheat caught once is caught (and charged) every time after,
# while an honest node, which should not lose spot checks (README "Spot checks"), never pays
# for the rule.
PROBATION_UPDATES = 5


def trust_score(accepted: int, rejected: int, mismatches: int = 0) -> float:
    """Posterior mean trust in [0, 1]; ``rejected`` includes the ``mismatches``."""
    good = accepted + 1.0
    bad = (rejected - mismatches) + MISMATCH_WEIGHT * mismatches + 1.0
    return good / (good + bad)


def spot_check_rate(base_rate: float, trust: float, probation: bool = False) -> float:
    """The chance that one of the node's train shards is spot-checked: ``base_rate`` for a
    node at or above a new node's trust, raised in proportion as trust falls below it
    (double at 0.25, certain near 0); certain for a node on probation (it lost a spot check
    within its last ``PROBATION_UPDATES`` train updates)."""
    if base_rate <= 0:
        return 0.0
    if probation:
        return 1.0
    return min(1.0, base_rate * max(1.0, NEW_NODE_TRUST / max(trust, 1e-9)))


def plan_spot_checks(nodes: Sequence[int], trust: Mapping[int, float], base_rate: float,
                     rng: random.Random, institution: Mapping[int, int] | None = None,
                     probation: Collection[int] = frozenset()) -> dict[int, int]:
    """Pick this round's spot checks: ``{worker: checker}``, disjoint pairs of ``nodes``.

    Nodes are visited in random order; each not yet paired is checked with its
    ``spot_check_rate`` (nodes on ``probation`` first, always) by a free node not on
    probation, drawn at random with weight = its trust, from another
    ``institution`` than the worker's where one is free. Trust-weighted, so the checker is
    likely honest; drawn, not the single most trusted, so no node is a predictable partner;
    from another institution, so the nodes of one operator (who could agree on a forged
    result) are not paired while anyone else can check. Unknown nodes count as new.
    """
    if base_rate <= 0:
        return {}
    inst = institution or {}
    order = list(nodes)
    rng.shuffle(order)
    # nodes on probation first, so none is taken as another's checker before its own check
    order.sort(key=lambda n: n not in probation)
    free = set(order)
    pairs: dict[int, int] = {}
    for node in order:
        if node not in free:
            continue
        rate = spot_check_rate(base_rate, trust.get(node, NEW_NODE_TRUST), node in probation)
        if rng.random() >= rate:
            continue
        checker = pick_checker(node, [n for n in order if n in free], trust, rng, inst,
                               probation)
        if checker is None:
            continue
        pairs[node] = checker
        free -= {node, checker}
    return pairs


def pick_checker(worker: int, free: Sequence[int], trust: Mapping[int, float],
                 rng: random.Random, institution: Mapping[int, int] | None = None,
                 probation: Collection[int] = frozenset()) -> int | None:
    """A node of ``free`` to check ``worker``'s shard (see ``plan_spot_checks``): not the
    worker, not on probation (its result would only cost a recomputation), from another
    institution where one is free, drawn with weight = its trust. None if none fits."""
    inst = institution or {}
    others = [n for n in free if n != worker and n not in probation]
    if not others:
        return None
    outside = [n for n in others if inst.get(n) is None or inst.get(n) != inst.get(worker)]
    pool = outside or others
    weights = [max(trust.get(n, NEW_NODE_TRUST), 1e-6) for n in pool]
    return rng.choices(pool, weights=weights)[0]

"""Trust scores and spot-check planning (coordinator.trust)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from coordinator.trust import (
    MISMATCH_WEIGHT, NEW_NODE_TRUST, plan_spot_checks, spot_check_rate, trust_score,
)


def test_trust_is_the_beta_posterior_mean() -> None:
    assert trust_score(0, 0) == NEW_NODE_TRUST == 0.5
    assert trust_score(8, 0) == pytest.approx(9 / 10)
    assert trust_score(3, 1) == pytest.approx(4 / 6)  # Beta(4, 2)
    assert trust_score(0, 2) == pytest.approx(1 / 4)


def test_a_lost_spot_check_weighs_more_than_a_rejection() -> None:
    assert MISMATCH_WEIGHT == 5.0
    # 4 accepted, 1 mismatch: Beta(5, 0 + 5 + 1)
    assert trust_score(4, 1, mismatches=1) == pytest.approx(5 / 11)
    assert trust_score(4, 1, mismatches=1) < trust_score(4, 1)


def test_spot_check_rate_rises_as_trust_falls() -> None:
    assert spot_check_rate(0.1, 0.5) == pytest.approx(0.1)
    assert spot_check_rate(0.1, 0.9) == pytest.approx(0.1)  # never below the base rate
    assert spot_check_rate(0.1, 0.25) == pytest.approx(0.2)
    assert spot_check_rate(0.1, 0.01) == 1.0
    assert spot_check_rate(0.0, 0.01) == 0.0


def test_plan_pairs_distinct_nodes_with_the_most_trusted_checker() -> None:
    trust = {1: 0.9, 2: 0.5, 3: 0.5, 4: 0.2}
    pairs = plan_spot_checks([1, 2, 3, 4], trust, 1.0, random.Random(0))
    assert len(pairs) == 2
    nodes = list(pairs) + list(pairs.values())
    assert sorted(nodes) == [1, 2, 3, 4]  # disjoint pairs
    assert 1 in pairs.values()  # the most trusted node checks first
    assert all(w != c for w, c in pairs.items())


def test_plan_is_off_at_rate_zero_and_needs_two_nodes() -> None:
    assert plan_spot_checks([1, 2, 3], {}, 0.0, random.Random(0)) == {}
    assert plan_spot_checks([1], {}, 1.0, random.Random(0)) == {}


def test_plan_checks_distrusted_nodes_more_often() -> None:
    rng = random.Random(1)
    checked = Counter()
    for _ in range(4000):
        for worker in plan_spot_checks([1, 2, 3, 4, 5, 6], {6: 0.05}, 0.1, rng):
            checked[worker] += 1
    assert checked[6] > 3 * max(checked[n] for n in range(1, 6))
    assert 250 < checked[1] < 650  # about the base rate of 4000 rounds

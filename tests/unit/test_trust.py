"""Trust scores and spot-check planning (coordinator.verify.trust)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from coordinator.verify.trust import (
    MISMATCH_WEIGHT, NEW_NODE_TRUST, PROBATION_UPDATES, plan_spot_checks, spot_check_rate,
    trust_score,
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


def test_plan_pairs_distinct_nodes() -> None:
    trust = {1: 0.9, 2: 0.5, 3: 0.5, 4: 0.2}
    for seed in range(20):
        pairs = plan_spot_checks([1, 2, 3, 4], trust, 1.0, random.Random(seed))
        assert len(pairs) == 2
        nodes = list(pairs) + list(pairs.values())
        assert sorted(nodes) == [1, 2, 3, 4]  # disjoint pairs
        assert all(w != c for w, c in pairs.items())


def test_checkers_are_drawn_by_trust_not_fixed() -> None:
    # node 9 is checked every round: by whom is a draw weighted by trust, so the most
    # trusted checks most often but is not a partner 9 can count on
    trust = {1: 0.9, 2: 0.6, 3: 0.1, 9: 0.001}  # 9: always checked; the others rarely
    by = Counter()
    rng = random.Random(2)
    for _ in range(3000):
        pairs = plan_spot_checks([1, 2, 3, 9], trust, 0.01, rng)
        if list(pairs) == [9]:  # the only check: its checker was drawn from all of 1, 2, 3
            by[pairs[9]] += 1
    total = sum(by.values())
    assert total > 500
    for checker, share in ((1, 0.9 / 1.6), (2, 0.6 / 1.6), (3, 0.1 / 1.6)):
        assert by[checker] / total == pytest.approx(share, abs=0.05), by


def test_a_checker_comes_from_another_institution_when_one_is_free() -> None:
    # nodes 1, 2 belong to one operator; 3, 4 to another institution
    inst = {1: 7, 2: 7, 3: 8, 4: 8}
    trust = {1: 0.99, 2: 0.99, 3: 0.3, 4: 0.3}  # the operator's nodes look best
    rng = random.Random(3)
    for _ in range(500):
        for worker, checker in plan_spot_checks([1, 2, 3, 4], trust, 1.0, rng, inst).items():
            assert inst[worker] != inst[checker]
    # one institution only: its nodes check each other, as before
    assert plan_spot_checks([1, 2], trust, 1.0, random.Random(0), inst) in ({1: 2}, {2: 1})


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


def test_a_node_on_probation_is_checked_every_time() -> None:
    assert PROBATION_UPDATES == 5
    assert spot_check_rate(0.1, 0.9, probation=True) == 1.0
    assert spot_check_rate(0.0, 0.9, probation=True) == 0.0  # spot checks off: off
    rng = random.Random(4)
    for _ in range(200):
        pairs = plan_spot_checks([1, 2, 3, 4], {}, 0.01, rng, probation={3})
        assert 3 in pairs and 3 not in pairs.values()  # checked, never a checker
    both = plan_spot_checks([1, 2, 3, 4], {}, 0.01, rng, probation={3, 4})
    assert set(both) == {3, 4} and set(both.values()) == {1, 2}

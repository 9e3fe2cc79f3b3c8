"""The round-level rules (coordinator.verify.rules) on hand-made updates and numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.verify.rules import (
    base_mismatch, duplicates, l2_norm, norm_outliers, not_useful, rel_l2, spot_check,
)


def arrays(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values[:-1], np.float32), "b": np.array(values[-1:], np.float32)}


# -- helpers -------------------------------------------------------------------------------

def test_norms_and_relative_distance_by_hand() -> None:
    a, b = arrays(3.0, 0.0, 4.0), arrays(3.0, 0.0, 0.0)
    assert l2_norm(a) == pytest.approx(5.0) and l2_norm(b) == pytest.approx(3.0)
    assert rel_l2(a, b) == pytest.approx(4.0 / 5.0)  # |(0, 0, 4)| / max(5, 3)
    assert rel_l2(a, a) == 0.0
    assert rel_l2(a, arrays(0.0, 0.0, 0.0)) == pytest.approx(1.0)
    assert rel_l2(a, {k: -v for k, v in a.items()}) == pytest.approx(2.0)
    assert rel_l2(arrays(0.0, 0.0, 0.0), arrays(0.0, 0.0, 0.0)) == 0.0


# -- duplicates ----------------------------------------------------------------------------

def test_later_copies_are_duplicates_and_the_first_is_kept() -> None:
    got = duplicates(["x", "y", "x", "x"], [1, 2, 3, 4], set())
    assert set(got) == {2, 3}
    assert "node 1" in got[2] and "node 1" in got[3]


def test_a_spot_check_pair_may_be_equal() -> None:
    assert duplicates(["x", "y", "x"], [1, 2, 3], {frozenset((0, 2))}) == {}
    # ... but a third copy of the same work is still a duplicate
    assert set(duplicates(["x", "x", "x"], [1, 2, 3], {frozenset((0, 1))})) == {2}


def test_arrays_accepted_in_an_earlier_round_are_duplicates() -> None:
    seen = {"old": "update 7 of node 2, accepted before"}
    got = duplicates(["new", "old"], [1, 2], set(), seen.get)
    assert list(got) == [1] and "update 7" in got[1]


# -- adaptive norm bound --------------------------------------------------------------------

def test_norm_outliers_against_the_round_median() -> None:
    norms = [10.0, 11.0, 9.0, 12.0, 100.0, 0.0, 2.9]
    got = norm_outliers(norms, 3.0)  # median 10: keep [10/3, 30]
    assert set(got) == {4, 5, 6}
    assert "exceeds 3 x the round's median 10" in got[4]
    assert "below the round's median 10 / 3" in got[5]
    assert norm_outliers([10.0, 30.0, 10.0], 3.0) == {}  # exactly 3 x is allowed


def test_norm_bound_needs_three_updates_and_can_be_off() -> None:
    assert norm_outliers([1.0, 1000.0], 3.0) == {}  # which of two is the outlier?
    assert norm_outliers([1.0, 1.0, 1000.0], 0.0) == {}


# -- spot checks ---------------------------------------------------------------------------

def never() -> dict[str, np.ndarray]:
    raise AssertionError("agreeing results are not recomputed")


def test_results_within_tolerance_agree_without_recomputing() -> None:
    a = arrays(1.0, 2.0, 3.0)
    b = {k: v * np.float32(1.05) for k, v in a.items()}  # bf16-vs-fp32-sized difference
    out = spot_check(a, b, 0.1, never)
    assert out.losers == () and not out.recomputed
    assert out.distance == pytest.approx(0.05 / 1.05, rel=1e-5)


def test_mismatch_is_decided_by_the_recomputation() -> None:
    honest, forged = arrays(1.0, 2.0, 3.0), arrays(-10.0, -20.0, -30.0)
    calls = []

    def recompute() -> dict[str, np.ndarray]:
        calls.append(1)
        return arrays(1.0, 2.0, 3.01)

    out = spot_check(honest, forged, 0.1, recompute)
    assert out.losers == (1,) and out.recomputed and calls == [1]
    assert spot_check(forged, honest, 0.1, recompute).losers == (0,)
    assert "recomputation" in out.detail


def test_both_lose_when_neither_matches_the_recomputation() -> None:
    out = spot_check(arrays(1.0, 0.0, 0.0), arrays(0.0, 1.0, 0.0), 0.1,
                     lambda: arrays(0.0, 0.0, 1.0))
    assert out.losers == (0, 1)


def test_a_result_far_in_parameters_but_at_the_same_loss_stands() -> None:
    # bf16 against fp32 from a young model: far apart in parameters, same loss on the shard
    ref = arrays(1.0, 2.0, 3.0)
    bf16, partial = arrays(1.0, 2.6, 3.0), arrays(0.5, 1.0, 1.5)
    loss = {id(ref): 2.000, id(bf16): 2.008, id(partial): 2.09}
    scored = []

    def score(x) -> float:  # type: ignore[no-untyped-def]
        scored.append(id(x))
        return loss[id(x)]

    out = spot_check(bf16, partial, 0.1, lambda: ref, score, 0.02)
    assert out.losers == (1,) and out.recomputed
    assert "shard loss +0.008 and +0.09 nats" in out.detail
    # off, or without a scorer: parameters alone decide, and both are too far
    assert spot_check(bf16, partial, 0.1, lambda: ref, score, 0.0).losers == (0, 1)
    assert spot_check(bf16, partial, 0.1, lambda: ref).losers == (0, 1)
    # NaN (no window to score on) is never within the tolerance
    assert spot_check(bf16, partial, 0.1, lambda: ref, lambda x: math.nan, 0.02).losers == (0, 1)
    # both close to the recomputation in loss: both stand, though they disagreed
    loss[id(partial)] = 1.99
    assert spot_check(bf16, partial, 0.1, lambda: ref, score, 0.02).losers == ()
    # results that agree are neither recomputed nor scored
    scored.clear()
    assert spot_check(ref, ref, 0.1, never, score, 0.02).losers == () and scored == []


# -- usefulness ----------------------------------------------------------------------------

RULES = dict(tolerance=2.0, min_improvement=0.01, min_fraction=0.05)


def test_useful_updates_pass() -> None:
    assert not_useful([0.3, 0.2, 0.25], [0.5, 0.4, 0.6], **RULES) == {}


def test_an_update_that_makes_held_out_loss_much_worse_is_rejected() -> None:
    got = not_useful([0.3, -2.5, 0.2], [0.5, 0.4, 0.6], **RULES)  # floor min(0, 0.2) - 2
    assert list(got) == [1] and "worse" in got[1]
    assert not_useful([0.3, -1.9, 0.2], [0.5, 0.4, 0.6], **RULES) == {}


def test_held_out_floor_follows_a_round_where_every_update_is_worse() -> None:
    # late in a run local models drift: the honest median is below zero
    held = [-0.9, -1.2, -3.0, -1.0]  # median -1.1: floor -3.1
    assert not_useful(held, [0.3] * 4, **RULES) == {}
    assert list(not_useful(held + [-3.5], [0.3] * 5, **RULES)) == [4]  # floor -3.2


def test_a_free_rider_is_rejected() -> None:
    got = not_useful([0.3, 0.0, 0.2], [0.5, 0.0, 0.6], **RULES)  # zero update: exactly 0
    assert list(got) == [1] and "own shard" in got[1]


def test_a_token_update_is_rejected_by_the_relative_rule() -> None:
    # 0.02 > min_improvement, but < 0.05 x the median 0.5
    got = not_useful([0.3, 0.01, 0.2, 0.25], [0.5, 0.02, 0.6, 0.45], **RULES)
    assert list(got) == [1]


def test_a_lone_free_rider_fails_the_absolute_rule() -> None:
    assert list(not_useful([0.0], [0.0], **RULES)) == [0]
    assert not_useful([0.0], [0.02], **RULES) == {}


def test_non_finite_scores_are_rejected_and_do_not_poison_the_median() -> None:
    got = not_useful([0.3, math.nan, 0.2], [0.5, 0.4, 0.6], **RULES)
    assert list(got) == [1]
    got = not_useful([0.3, 0.25, 0.2], [0.5, math.nan, 0.6], **RULES)
    assert list(got) == [1]
    assert not_useful([], [], **RULES) == {}


def test_of_two_updates_the_better_one_sets_the_bar() -> None:
    # the upper median: a wrecked update cannot pull the floor halfway down to itself
    got = not_useful([0.5, -2.2], [0.5, 0.4], **RULES)  # floor min(0, 0.5) - 2 = -2
    assert list(got) == [1]
    assert not_useful([-0.5, -2.2], [0.5, 0.4], **RULES) == {}  # floor -2.5


def test_base_mismatch_against_the_coordinators_first_batch_loss() -> None:
    reported = [3.1000, 3.1015, 3.0990, 3.1250, math.nan]
    measured = [3.1000, 3.1000, 3.1000, 3.1000, 3.1000]
    got = base_mismatch(reported, measured, 0.002)
    assert sorted(got) == [3, 4]  # 0.0015 and 0.001 are within, 0.025 is not, NaN never
    assert "reports loss 3.1250" in got[3] and "scores 3.1000" in got[3]
    assert "not trained from that base" in got[3]
    assert base_mismatch(reported, measured, 0.0) == {}  # off
    with pytest.raises(ValueError):
        base_mismatch([1.0], [1.0, 2.0], 0.002)

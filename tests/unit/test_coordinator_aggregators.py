from __future__ import annotations

import numpy as np
import pytest

import dataclasses
import math

from coordinator.aggregators import Aggregator, available_aggregators, get_aggregator, register
from coordinator.aggregators.centered_clip import CenteredClipAggregator
from coordinator.aggregators.mean import MeanAggregator
from coordinator.aggregators.median import MedianAggregator
from coordinator.aggregators.trimmed_mean import TrimmedMeanAggregator
from coordinator.config import AggregationParams

ALL = ["mean", "trimmed_mean", "median", "centered_clip"]


def test_registry() -> None:
    assert "mean" in available_aggregators()
    agg = get_aggregator("mean")
    assert isinstance(agg, MeanAggregator) and isinstance(agg, Aggregator) and agg.name == "mean"
    with pytest.raises(ValueError, match="unknown aggregator 'median2', choose one of mean"):
        get_aggregator("median2")
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Again", (MeanAggregator,), {}))


def test_token_weighted_mean_hand_computed() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    b = {"w": np.array([5.0, 6.0], np.float32), "b": np.array([[4.0]], np.float32)}
    out = get_aggregator("mean").aggregate([a, b], [1, 3])
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5];  (1*0 + 3*4) / 4 = 3
    np.testing.assert_array_equal(out["w"], [4.0, 5.0])
    np.testing.assert_array_equal(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32 and out["b"].shape == (1, 1)


def test_single_update_and_zero_weight() -> None:
    a = {"w": np.array([1.0, -2.0], np.float32)}
    b = {"w": np.array([100.0, 100.0], np.float32)}
    np.testing.assert_array_equal(get_aggregator("mean").aggregate([a], [7])["w"], [1.0, -2.0])
    np.testing.assert_array_equal(get_aggregator("mean").aggregate([a, b], [2, 0])["w"], [1.0, -2.0])


def test_accumulates_in_float64() -> None:
    # float32 summation of 1 + 1e-8 ... loses the small terms; float64 keeps them
    big = {"w": np.array([1.0], np.float32)}
    small = {"w": np.array([1e-8], np.float32)}
    out = get_aggregator("mean").aggregate([big] + [small] * 1000, [1] * 1001)
    assert out["w"][0] == np.float32((1.0 + 1000 * np.float64(np.float32(1e-8))) / 1001)


def test_blocks_give_the_bits_of_the_plain_float64_sum() -> None:
    """Arrays longer than a block, a length that is no multiple of it, uneven weights."""
    rng = np.random.default_rng(11)
    mean = MeanAggregator()
    mean.block = 1000
    ups = [{"w": rng.standard_normal((7, 450)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32)} for _ in range(5)]
    weights = [3.0, 1.0, 0.5, 2.5, 7.0]
    got = mean.aggregate(ups, weights)
    total = sum(weights)
    for name in ("w", "b"):
        want = np.zeros(ups[0][name].shape)
        for wi, u in zip(weights, ups):
            want += (wi / total) * u[name].astype(np.float64)
        assert got[name].shape == ups[0][name].shape
        np.testing.assert_array_equal(got[name], want.astype(np.float32))


@pytest.mark.parametrize("updates, weights, match", [
    ([], [], "nothing to aggregate"),
    ([{"w": np.zeros(2)}], [1, 2], "1 updates but 2 weights"),
    ([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1], "update 1 has arrays"),
    ([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1], "shape"),
    ([{"w": np.zeros(2)}], [0], "not all zero"),
    ([{"w": np.zeros(2)}], [-1], "non-negative"),
    ([{"w": np.zeros(2)}], [float("nan")], "finite"),
])
@pytest.mark.parametrize("method", ALL)
def test_bad_input(method, updates, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_aggregator(method).aggregate(updates, weights)


# -- registry and parameters ------------------------------------------------------------

def test_all_registered_in_order() -> None:
    assert available_aggregators() == ALL
    for cls in (TrimmedMeanAggregator, MedianAggregator, CenteredClipAggregator):
        assert isinstance(get_aggregator(cls.name), cls)


def test_params_from_config_section() -> None:
    section = dataclasses.asdict(AggregationParams(method="centered_clip", trim_fraction=0.3,
                                                   clip_radius=2.5, iterations=7,
                                                   clip_from_previous=True))
    clip = get_aggregator("centered_clip", section)
    assert (clip.clip_radius, clip.iterations, clip.from_previous) == (2.5, 7, True)
    assert get_aggregator("trimmed_mean", section).trim_fraction == 0.3
    assert isinstance(get_aggregator("mean", section), MeanAggregator)  # ignores others' keys


def test_config_defaults_match_aggregator_defaults() -> None:
    section = dataclasses.asdict(AggregationParams())
    assert vars(get_aggregator("trimmed_mean", section)) == vars(get_aggregator("trimmed_mean"))
    assert vars(get_aggregator("centered_clip", section)) == vars(get_aggregator("centered_clip"))


@pytest.mark.parametrize("method, params, match", [
    ("trimmed_mean", {"trim_fraction": 0.5}, "trim_fraction must be in"),
    ("trimmed_mean", {"trim_fraction": -0.1}, "trim_fraction must be in"),
    ("centered_clip", {"clip_radius": -1.0}, "clip_radius must be"),
    ("centered_clip", {"clip_radius": math.inf}, "clip_radius must be"),
    ("centered_clip", {"iterations": 0}, "iterations must be"),
])
def test_bad_params(method, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_aggregator(method, params)


def _u(**arrays) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


@pytest.mark.parametrize("method", ALL)
def test_float32_out_same_names_and_shapes(method) -> None:
    ups = [_u(w=[[1.0, 2.0, 3.0]], b=[i]) for i in range(4)]
    out = get_aggregator(method).aggregate(ups, [1, 2, 3, 4])
    assert sorted(out) == ["b", "w"]
    assert out["w"].shape == (1, 3) and out["b"].shape == (1,)
    assert all(a.dtype == np.float32 for a in out.values())
    np.testing.assert_allclose(out["w"], [[1.0, 2.0, 3.0]], rtol=1e-6)  # all agree


# -- trimmed mean -----------------------------------------------------------------------

def test_trimmed_mean_hand_computed() -> None:
    ups = [_u(w=[1, -50], b=[5]), _u(w=[2, 0], b=[5]), _u(w=[3, 8], b=[5]),
           _u(w=[4, 4], b=[5]), _u(w=[100, 6], b=[5])]
    out = get_aggregator("trimmed_mean").aggregate(ups, [1, 2, 1, 1, 1])
    # n = 5, trim 0.2 -> k = 1 per side.
    # w[0]: 1 2 3 4 100 -> keep 2 (weight 2), 3 (1), 4 (1): (2*2 + 3 + 4) / 4 = 2.75
    # w[1]: -50 0 4 6 8 -> keep 0 (weight 2), 4 (1), 6 (1): (0 + 4 + 6) / 4 = 2.5
    np.testing.assert_array_equal(out["w"], [2.75, 2.5])
    np.testing.assert_array_equal(out["b"], [5.0])


def test_trimmed_mean_k_from_live_updates() -> None:
    ups = [_u(w=[1]), _u(w=[2]), _u(w=[3]), _u(w=[4]), _u(w=[1000])]
    agg = TrimmedMeanAggregator(trim_fraction=0.2)
    # 4 updates with weight > 0 -> k = floor(0.8) = 0: plain weighted mean (1*1 + 1*2 + 2*4) / 4
    np.testing.assert_array_equal(agg.aggregate(ups, [1, 1, 0, 2, 0])["w"], [2.75])
    # all 5 live, trim 0.4 -> k = 2 per side: only the middle value 3 is left
    np.testing.assert_array_equal(TrimmedMeanAggregator(0.4).aggregate(ups, [1] * 5)["w"], [3.0])
    # trim 0 is the mean
    np.testing.assert_array_equal(TrimmedMeanAggregator(0.0).aggregate(ups, [1, 1, 1, 1, 4])["w"],
                                  [(1 + 2 + 3 + 4 + 4000) / 8])


def test_trimmed_mean_accumulates_in_float64() -> None:
    big, small = _u(w=[1.0]), _u(w=[1e-8])
    ups, weights = [big] + [small] * 1000, [1] * 1001
    assert TrimmedMeanAggregator(0.0).aggregate(ups, weights)["w"][0] == \
        get_aggregator("mean").aggregate(ups, weights)["w"][0]


@pytest.mark.parametrize("seed", range(5))
def test_trimmed_mean_outliers_stay_in_honest_range(seed) -> None:
    rng = np.random.default_rng(seed)
    n, f = 10, 2                       # trim 0.2 of 10 -> k = 2 >= f
    honest = rng.normal(size=(n - f, 3, 4))
    bad = rng.choice([-1e30, 1e30], size=(f, 3, 4))
    ups = [_u(w=x) for x in np.concatenate([honest, bad])]
    out = get_aggregator("trimmed_mean").aggregate(ups, rng.integers(1, 100, n).tolist())["w"]
    lo, hi = honest.astype(np.float32).min(0), honest.astype(np.float32).max(0)
    assert np.all(lo <= out) and np.all(out <= hi)


# -- median -----------------------------------------------------------------------------

def test_median_hand_computed() -> None:
    ups = [_u(w=[3, 1], b=[[1]]), _u(w=[1, 2], b=[[2]]), _u(w=[2, 3], b=[[3]]),
           _u(w=[10, 4], b=[[4]])]
    # equal weights, n = 4: the midpoint of the two middle values (= np.median)
    # w[0]: 1 2 3 10 -> 2.5;  w[1]: 1 2 3 4 -> 2.5;  b: 1 2 3 4 -> 2.5
    out = get_aggregator("median").aggregate(ups, [1, 1, 1, 1])
    np.testing.assert_array_equal(out["w"], [2.5, 2.5])
    np.testing.assert_array_equal(out["b"], [[2.5]])
    # odd n: the middle value; w: (3,1,2) -> 2, (1,2,3) -> 2
    np.testing.assert_array_equal(get_aggregator("median").aggregate(ups[:3], [1] * 3)["w"], [2, 2])


def test_weighted_median_hand_computed() -> None:
    ups = [_u(w=[1]), _u(w=[2]), _u(w=[3]), _u(w=[4])]
    med = get_aggregator("median")
    # weights 1 1 3 (of 5): cumulative 0.2 0.4 1.0 -> half reached at 3
    np.testing.assert_array_equal(med.aggregate(ups[:3], [1, 1, 3])["w"], [3.0])
    # weights 3 1 2 2 (of 8): cumulative 0.375 0.5 0.75 1 -> exactly half at 2: (2 + 3) / 2
    np.testing.assert_array_equal(med.aggregate(ups, [3, 1, 2, 2])["w"], [2.5])
    # a zero-weight value has no say: 1 and 3 with weight 1 each -> (1 + 3) / 2
    np.testing.assert_array_equal(med.aggregate([ups[0], _u(w=[100]), ups[2]], [1, 0, 1])["w"],
                                  [2.0])


@pytest.mark.parametrize("n", [3, 4, 5, 8, 11])
def test_median_outliers_stay_in_honest_range(n) -> None:
    rng = np.random.default_rng(n)
    f = (n - 1) // 2                   # f < n / 2
    honest = rng.normal(size=(n - f, 6))
    bad = rng.choice([-1e30, 1e30], size=(f, 6))
    ups = [_u(w=x) for x in np.concatenate([honest, bad])]
    out = get_aggregator("median").aggregate(ups, [1] * n)["w"]
    lo, hi = honest.astype(np.float32).min(0), honest.astype(np.float32).max(0)
    assert np.all(lo <= out) and np.all(out <= hi)
    # by tokens: the outliers may be the majority by count if they hold less than half the weight
    out = get_aggregator("median").aggregate(ups[:2] + ups[-f:], [f + 1, f + 1] + [1] * f)["w"]
    lo, hi = np.minimum(ups[0]["w"], ups[1]["w"]), np.maximum(ups[0]["w"], ups[1]["w"])
    assert np.all(lo <= out) and np.all(out <= hi)


# -- centered clipping ------------------------------------------------------------------

def test_centered_clip_hand_computed_from_median() -> None:
    ups = [_u(a=[1, 2]), _u(a=[5, -2]), _u(a=[2, 10])]
    # start: median (2, 2). x - v: (-1, 0) |1|, (3, -4) |5|, (0, 8) |8|
    # radius 2.5: (-1, 0), (1.5, -2), (0, 2.5); mean (0.5, 0.5) / 3 -> v = 2 + 1/6 each
    out = CenteredClipAggregator(clip_radius=2.5, iterations=1).aggregate(ups, [1, 1, 1])
    np.testing.assert_allclose(out["a"], [13 / 6, 13 / 6], rtol=1e-6)
    # radius 0 = median distance 5: (-1, 0), (3, -4), (0, 5); sum (2, 1) / 3 -> (8/3, 7/3)
    out = CenteredClipAggregator(clip_radius=0, iterations=1).aggregate(ups, [1, 1, 1])
    np.testing.assert_allclose(out["a"], [8 / 3, 7 / 3], rtol=1e-6)


def test_centered_clip_hand_computed_weighted_two_arrays() -> None:
    ups = [_u(a=[0, 0], b=[0]), _u(a=[0, 0], b=[0]), _u(a=[3, 0], b=[4])]
    zero = {"a": np.zeros(2), "b": np.zeros(1)}
    agg = CenteredClipAggregator(clip_radius=1.0, iterations=2)
    out = agg.aggregate(ups, [1, 1, 2], reference=zero)
    # weights 0.25 0.25 0.5; the norm spans a and b together: |(3, 0, 4)| = 5
    # it 1, v = 0: clip (3, 0, 4) to (0.6, 0, 0.8); v = 0.5 * that = (0.3, 0, 0.4)
    # it 2: x1 - v = x2 - v = (-0.3, 0, -0.4), |0.5| kept;
    #       x3 - v = (2.7, 0, 3.6), |4.5| -> (0.6, 0, 0.8)
    #       step = 0.5 * (-0.3, 0, -0.4) + 0.5 * (0.6, 0, 0.8) = (0.15, 0, 0.2); v = (0.45, 0, 0.6)
    np.testing.assert_allclose(out["a"], [0.45, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.6], rtol=1e-6)


def test_centered_clip_large_radius_is_the_mean_in_float64() -> None:
    big, small = _u(w=[1.0]), _u(w=[1e-8])
    ups, weights = [big] + [small] * 1000, [1] * 1001
    out = CenteredClipAggregator(clip_radius=1e9, iterations=1).aggregate(
        ups, weights, reference={"w": np.zeros(1)})
    assert out["w"][0] == get_aggregator("mean").aggregate(ups, weights)["w"][0]


def test_centered_clip_from_previous() -> None:
    agg = CenteredClipAggregator(clip_radius=1.0, iterations=1, from_previous=True)
    np.testing.assert_array_equal(agg.aggregate([_u(w=[1, 1])] * 3, [1] * 3)["w"], [1, 1])
    # starts at the previous (1, 1), not the median (3, 1): (2, 0) clipped to (1, 0) -> (2, 1)
    np.testing.assert_array_equal(agg.aggregate([_u(w=[3, 1])] * 3, [1] * 3)["w"], [2, 1])
    # new shapes: the previous result does not fit, back to the median start
    np.testing.assert_array_equal(agg.aggregate([_u(w=[3])] * 3, [1] * 3)["w"], [3])
    # without from_previous nothing is kept
    plain = CenteredClipAggregator(clip_radius=1.0, iterations=1)
    plain.aggregate([_u(w=[1, 1])], [1])
    np.testing.assert_array_equal(plain.aggregate([_u(w=[3, 1])] * 3, [1] * 3)["w"], [3, 1])


def test_centered_clip_bad_reference() -> None:
    with pytest.raises(ValueError, match="reference must have"):
        CenteredClipAggregator().aggregate([_u(w=[1])], [1], reference={"v": np.zeros(1)})
    with pytest.raises(ValueError, match="reference must have"):
        CenteredClipAggregator().aggregate([_u(w=[1])], [1], reference={"w": np.zeros(2)})


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.square(np.float64(a[k]) - b[k]).sum()) for k in a))


@pytest.mark.parametrize("seed", range(5))
def test_centered_clip_bounds_one_huge_outlier(seed) -> None:
    rng = np.random.default_rng(seed)
    n, f, tau = 5, 1, 1.0
    honest = [_u(a=rng.normal(scale=0.01, size=(3, 4)), b=rng.normal(scale=0.01, size=4))
              for _ in range(n - f)]
    bad = _u(a=rng.choice([-1e6, 1e6], size=(3, 4)), b=np.full(4, 1e6))
    mean = {k: np.mean([np.float64(h[k]) for h in honest], axis=0) for k in ("a", "b")}
    tol = 1e-5  # float32 output
    # one step from the honest mean: the outlier moves it by at most tau * f / n
    out = CenteredClipAggregator(tau, iterations=1).aggregate(honest + [bad], [1] * n,
                                                             reference=mean)
    assert _distance(out, mean) <= tau * f / n + tol
    # from the median, iterated: at most tau * f / (n - f), the fixed point's bound
    out = CenteredClipAggregator(tau, iterations=30).aggregate(honest + [bad], [1] * n)
    assert _distance(out, mean) <= tau * f / (n - f) + tol
    # and the default radius (median distance, set by the honest majority) stays close too
    out = CenteredClipAggregator().aggregate(honest + [bad], [1] * n)
    assert _distance(out, mean) <= 0.1

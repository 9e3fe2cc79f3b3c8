from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import Aggregator, available_aggregators, get_aggregator, register
from coordinator.aggregators.mean import MeanAggregator


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


@pytest.mark.parametrize("updates, weights, match", [
    ([], [], "nothing to aggregate"),
    ([{"w": np.zeros(2)}], [1, 2], "1 updates but 2 weights"),
    ([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1], "update 1 has arrays"),
    ([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1], "shape"),
    ([{"w": np.zeros(2)}], [0], "not all zero"),
    ([{"w": np.zeros(2)}], [-1], "non-negative"),
    ([{"w": np.zeros(2)}], [float("nan")], "finite"),
])
def test_bad_input(updates, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_aggregator("mean").aggregate(updates, weights)

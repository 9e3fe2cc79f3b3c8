"""Coordinate-wise weighted median (Yin et al. 2018).

Per coordinate: the value at which the cumulative weight of the sorted values reaches one
half; when it lands exactly on one half between two values, their midpoint (so equal weights
give ``np.median``). While the updates one trusts hold more than half the weight, the result
lies within their range at every coordinate, whatever the others send.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregators.base import Aggregator, Arrays, check_inputs, register, stack

__all__ = ["MedianAggregator", "weighted_median"]

# normalised weights summing to 1 in float64: below this, "reaches one half" is a tie
_TIE = 1e-12


def weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted median over axis 0 of ``x`` (n, ...) with weights ``w`` (n,) summing to 1."""
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, axis=0)
    cum = np.cumsum(w[order], axis=0)
    lower = np.argmax(cum >= 0.5 - _TIE, axis=0)[None]  # first value reaching one half
    upper = np.argmax(cum > 0.5 + _TIE, axis=0)[None]   # first value passing it
    lo = np.take_along_axis(xs, lower, axis=0)[0]
    hi = np.take_along_axis(xs, upper, axis=0)[0]
    return (lo + hi) / 2


@register
class MedianAggregator(Aggregator):
    """Coordinate-wise median weighted by tokens; zero-weight updates have no say."""

    name = "median"

    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
        w = check_inputs(updates, weights)
        return {name: weighted_median(stack(updates, name), w).astype(np.float32)
                for name in updates[0]}

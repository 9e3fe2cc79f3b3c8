"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ``k`` largest and
``k`` smallest values, ``k = floor(trim_fraction * n)``, and average the rest.

Weights and trimming: trimming counts updates, not tokens, so one node cannot buy its way past
the trim with a large token count; the values kept at a coordinate are then averaged with the
weights of the updates they came from. Updates of weight 0 have no say and are dropped before
``k`` is computed. With ``k = 0`` (e.g. fewer than 5 updates at 0.2) this is the plain mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Arrays, check_inputs, register, stack

__all__ = ["TrimmedMeanAggregator", "trimmed_mean"]


def trimmed_mean(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Weighted mean over axis 0 of ``x`` (n, ...) without the ``k`` largest and ``k``
    smallest values of each coordinate; ``w`` (n,) positive weights; needs ``2k < n``."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    kept = np.take_along_axis(x, order, axis=0)[k:n - k]
    kept_w = w[order[k:n - k]]  # (n - 2k, ...): each kept value's own weight
    return (kept * kept_w).sum(axis=0) / kept_w.sum(axis=0)


@register
class TrimmedMeanAggregator(Aggregator):
    """Tolerates up to ``k`` arbitrary values per coordinate; the result stays within the
    range of the others."""

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.2) -> None:
        if isinstance(trim_fraction, bool) or not (isinstance(trim_fraction, (int, float))
                                                   and 0 <= trim_fraction < 0.5):
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = float(trim_fraction)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrimmedMeanAggregator:
        return cls(**{k: params[k] for k in ("trim_fraction",) if k in params})

    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
        w = check_inputs(updates, weights)
        live = [i for i in range(len(updates)) if w[i] > 0]
        k = math.floor(self.trim_fraction * len(live))
        out: Arrays = {}
        for name in updates[0]:
            x = stack([updates[i] for i in live], name)
            out[name] = trimmed_mean(x, w[live], k).astype(np.float32)
        return out

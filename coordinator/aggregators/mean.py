"""Token-weighted mean: FedAvg over pseudo-gradients, as in DiLoCo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregators.base import Aggregator, Arrays, check_inputs, register

__all__ = ["MeanAggregator"]


@register
class MeanAggregator(Aggregator):
    """sum_i w_i * update_i / sum_i w_i, accumulated in float64, returned as float32."""

    name = "mean"

    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
        w = check_inputs(updates, weights)
        out: Arrays = {}
        for name in updates[0]:
            acc = np.zeros(updates[0][name].shape, dtype=np.float64)
            for wi, u in zip(w, updates):
                acc += wi * np.asarray(u[name], dtype=np.float64)
            out[name] = acc.astype(np.float32)
        return out

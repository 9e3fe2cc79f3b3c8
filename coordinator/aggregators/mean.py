"""Token-weighted mean: FedAvg over pseudo-gradients, as in DiLoCo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregators.base import Aggregator, Arrays, check_inputs, register

__all__ = ["MeanAggregator"]


@register
class MeanAggregator(Aggregator):
    """sum_i w_i * update_i / sum_i w_i, accumulated in float64, returned as float32.

    float64 because a large K sums many small terms into one array (the float32 sum of one
    large update and 1000 small ones loses the small ones). Cache-blocked: all K updates are
    summed into one small float64 block before the next, so the accumulator never leaves
    the cache and no float64 copy of an update is made: the same bits as the plain loop,
    as fast for the ``small`` preset's layers and 4.9x faster for 8M-value layers.
    """

    name = "mean"
    block = 1 << 17  # values per block: 2 x 1 MiB of float64 scratch

    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
        w = check_inputs(updates, weights)
        acc, tmp = np.empty(self.block), np.empty(self.block)
        out: Arrays = {}
        for name in updates[0]:
            flats = [np.asarray(u[name]).reshape(-1) for u in updates]
            res = np.empty(flats[0].size, np.float32)
            for i in range(0, res.size, self.block):
                n = min(self.block, res.size - i)
                a, b = acc[:n], tmp[:n]
                # a plain cast, then in-place products: a ufunc casting as it multiplies
                # measured 1.5x slower
                a[...] = flats[0][i:i + n]
                a *= w[0]
                for wi, f in zip(w[1:], flats[1:]):
                    b[...] = f[i:i + n]
                    b *= wi
                    a += b
                res[i:i + n] = a
            out[name] = res.reshape(np.shape(updates[0][name]))
        return out

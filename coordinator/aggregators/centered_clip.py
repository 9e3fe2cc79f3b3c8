"""Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine
Robust Optimization").

From a start point ``v`` repeat ``iterations`` times: ``v <- v + sum_i w_i clip(x_i - v)``
where ``clip`` scales a whole update (all arrays together) down to L2 norm ``clip_radius``.
One update of weight share ``p`` moves the result by at most ``p * clip_radius`` per
iteration, however large it is. The start is the coordinate-wise weighted median, or, with
``from_previous``, the previous round's result (the paper's choice: with momentum it is
already close to the new honest mean). ``clip_radius = 0`` picks the radius each round: the
weighted median of the updates' distances from the start, which the honest majority sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Arrays, check_inputs, register, stack
from coordinator.aggregators.median import weighted_median

__all__ = ["CenteredClipAggregator"]


def _distances(updates: Sequence[Arrays], v: Arrays) -> np.ndarray:
    """L2 distance of each update from ``v`` over all arrays together, shape (n,)."""
    sq = np.zeros(len(updates), dtype=np.float64)
    for name, center in v.items():
        for i, u in enumerate(updates):
            sq[i] += np.square(np.asarray(u[name], dtype=np.float64) - center).sum()
    return np.sqrt(sq)


@register
class CenteredClipAggregator(Aggregator):
    """Bounded influence per update; keeps the previous result when ``from_previous``."""

    name = "centered_clip"

    def __init__(self, clip_radius: float = 0.0, iterations: int = 3,
                 from_previous: bool = False) -> None:
        if isinstance(clip_radius, bool) or not isinstance(clip_radius, (int, float)) \
                or not 0 <= clip_radius < float("inf"):
            raise ValueError(f"clip_radius must be a non-negative number, got {clip_radius!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self.clip_radius = float(clip_radius)
        self.iterations = iterations
        self.from_previous = bool(from_previous)
        self.previous: Arrays | None = None  # float64, kept only when from_previous

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CenteredClipAggregator:
        keys = {"clip_radius": "clip_radius", "iterations": "iterations",
                "clip_from_previous": "from_previous"}
        return cls(**{arg: params[key] for key, arg in keys.items() if key in params})

    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float], *,
                  reference: Arrays | None = None) -> Arrays:
        """As ``Aggregator.aggregate``; ``reference`` (same names and shapes) overrides the
        start point for this call."""
        w = check_inputs(updates, weights)
        if reference is None and self.from_previous and self._fits(self.previous, updates[0]):
            reference = self.previous
        if reference is not None:
            if not self._fits(reference, updates[0]):
                raise ValueError("reference must have the updates' array names and shapes")
            v = {name: np.array(reference[name], dtype=np.float64) for name in updates[0]}
        else:
            v = {name: weighted_median(stack(updates, name), w) for name in updates[0]}
        radius = self.clip_radius or float(weighted_median(_distances(updates, v), w))
        for _ in range(self.iterations):
            dist = _distances(updates, v)
            # each update's share of the step: its weight, scaled down if it is too far
            share = w * np.where(dist > radius, radius / np.maximum(dist, 1e-300), 1.0)
            for name, center in v.items():
                step = np.zeros_like(center)
                for s, u in zip(share, updates):
                    if s:
                        step += s * (np.asarray(u[name], dtype=np.float64) - center)
                center += step
        if self.from_previous:
            self.previous = v
        return {name: arr.astype(np.float32) for name, arr in v.items()}

    @staticmethod
    def _fits(ref: Arrays | None, like: Arrays) -> bool:
        return ref is not None and ref.keys() == like.keys() and all(
            np.shape(ref[k]) == like[k].shape for k in like)

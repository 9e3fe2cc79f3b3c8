"""The ``Aggregator`` interface and the name registry that run.toml's
``[aggregation].method`` chooses from (the one list of allowed names)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["Aggregator", "Arrays", "register", "get_aggregator", "available_aggregators",
           "check_inputs", "stack"]

Arrays = dict[str, np.ndarray]


class Aggregator(ABC):
    """Combines accepted pseudo-gradients into one."""

    name: str

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Aggregator:
        """Build from run.toml's ``[aggregation]`` keys; each aggregator takes the keys it
        knows and ignores the others (the section holds every aggregator's keys)."""
        return cls()

    @abstractmethod
    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
        """Combine ``updates`` (same names and shapes) given per-update ``weights``
        (tokens trained); returns float32 arrays. Raises ValueError on bad input."""


_REGISTRY: dict[str, type[Aggregator]] = {}

A = TypeVar("A", bound=type[Aggregator])


def register(cls: A) -> A:
    """Class decorator: make ``cls`` selectable by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregator {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_aggregators() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def get_aggregator(name: str, params: Mapping[str, Any] | None = None) -> Aggregator:
    """A new aggregator by name, configured from ``params`` (the ``[aggregation]`` keys, e.g.
    ``dataclasses.asdict(cfg.aggregation)``; absent keys take the aggregator's defaults).
    ValueError names the choices, or the bad parameter."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}, choose one of "
                         f"{', '.join(_REGISTRY)}") from None
    return cls.from_params(params or {})


def check_inputs(updates: Sequence[Arrays], weights: Sequence[float]) -> np.ndarray:
    """Validate what every aggregator needs and return the weights normalised to sum 1
    (float64): at least one update, one finite non-negative weight each with a positive sum,
    the same array names and shapes in every update."""
    if not updates:
        raise ValueError("nothing to aggregate")
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {list(weights)}")
    first = updates[0]
    for i, u in enumerate(updates[1:], start=1):
        if u.keys() != first.keys():
            raise ValueError(f"update {i} has arrays {sorted(u)}, update 0 has {sorted(first)}")
        for name, arr in u.items():
            if arr.shape != first[name].shape:
                raise ValueError(f"update {i} array {name!r} has shape {arr.shape}, "
                                 f"update 0 has {first[name].shape}")
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def stack(updates: Sequence[Arrays], name: str) -> np.ndarray:
    """Array ``name`` of every update as one float64 array of shape (n_updates, *shape)."""
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])

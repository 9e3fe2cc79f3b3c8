"""Aggregators: one file per algorithm behind the ``Aggregator`` interface in ``base``.

Importing this package registers every built-in aggregator; a new one is a new module here
that subclasses ``Aggregator``, decorates itself with ``@register`` and is imported below.
"""

from __future__ import annotations

from coordinator.aggregators.base import (
    Aggregator, available_aggregators, check_inputs, get_aggregator, register,
)
# registration order is the order run.toml's error message lists the choices in
from coordinator.aggregators import mean as _mean  # noqa: F401  (registers "mean")
from coordinator.aggregators import trimmed_mean as _trimmed_mean  # noqa: F401
from coordinator.aggregators import median as _median  # noqa: F401
from coordinator.aggregators import centered_clip as _centered_clip  # noqa: F401

__all__ = ["Aggregator", "available_aggregators", "check_inputs", "get_aggregator", "register"]

"""Aggregators: one file per algorithm behind the ``Aggregator`` interface in ``base``.

Importing this package registers every built-in aggregator; a new one is a new module here
that subclasses ``Aggregator``, decorates itself with ``@register`` and is imported below.
"""

from __future__ import annotations

from coordinator.aggregators.base import (
    Aggregator, available_aggregators, check_inputs, get_aggregator, register,
)
from coordinator.aggregators import mean as _mean  # noqa: F401  (registers "mean")

__all__ = ["Aggregator", "available_aggregators", "check_inputs", "get_aggregator", "register"]

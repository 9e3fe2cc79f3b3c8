"""Flower's object pulls, retried at a pace that fits a reply's arrival.

A Flower message is listed (``PushMessages``) before its objects are in (one ``PushObject``
each, after): a pull that lands in between finds an object missing and Flower's
``pull_objects`` waits out a retry backoff that starts at **1 s**. Measured on the bench
network (3 nodes, 2 cores): the coordinator's poll of a reply took 1.1 s median for objects
that were all in ~0.3 s after the message, most of a lease's reply path. Starting the
backoff at 0.05 s (doubling as before, to Flower's cap) takes them as they land, for a few
small extra requests on the rare pull that comes early.

The same wait sat between a node's SuperNode and its worker: the worker claims a lease's
task as soon as the SuperNode lists it, while the SuperNode still pulls its objects, and
its pull of them (``pull_and_inflate_object_from_tree``, which passes its own 1 s default
on) then took 0.7-1.0 s for objects in ~0.3 s later.

Internal API (flwr is pinned; tests/unit/test_flower_runtime_contract.py checks it): the
defaults are read from the functions on every call, so setting them once per process
reaches every caller (the ServerApp's grid, the SuperNode's pull of a lease, the worker's
pull of its task).
"""

from __future__ import annotations

from flwr.supercore.inflatable import inflatable_utils

__all__ = ["QUICK_BACKOFF_S", "quick_object_pulls"]

QUICK_BACKOFF_S = 0.05


def quick_object_pulls(initial_backoff_s: float = QUICK_BACKOFF_S) -> None:
    """Start Flower's retry backoff for a missing object at ``initial_backoff_s``."""
    for pull in (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree):
        pull.__kwdefaults__["initial_backoff"] = initial_backoff_s

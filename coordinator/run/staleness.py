"""What one accepted update weighs in the outer step that aggregates it.

An update's weight is its verified tokens, times its node's trust with ``[verify]
trust_weighting``, times its staleness factor::

    weight = tokens * trust * (1 + tau) ** -staleness_power

where ``tau`` is how many versions its lease's base lies behind the version the outer step
applies to. The lock-step loop only aggregates fresh work (tau = 0: factor 1). The
asynchronous loop (``coordinator.run.async_loop``) also takes work built on one of the last
``max_staleness`` versions; the polynomial factor is FedAsync's (Xie et al. 2019) and
FedBuff's (Nguyen et al. 2022) choice: at the default power 0.5 an update one version behind
weighs 0.71 of a fresh one, three behind 0.5. Its pseudo-gradient was measured from an older
model, so it points a little off where the model is now; down-weighting (not dropping) keeps
the tokens a slow node paid for while letting fresh work steer. ``bench/fleet.py`` measures
what this costs in loss at equal tokens against the lock-step loop.
"""

from __future__ import annotations

__all__ = ["staleness_factor", "update_weight"]


def staleness_factor(tau: int, power: float) -> float:
    """``(1 + tau) ** -power``: 1 for fresh work (tau = 0), falling with staleness."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return (1.0 + tau) ** -power


def update_weight(tokens: int, trust: float, tau: int, power: float) -> float:
    """An accepted update's aggregation weight (``trust`` = 1.0 without trust weighting)."""
    return float(tokens) * trust * staleness_factor(tau, power)

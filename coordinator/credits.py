"""The credit policy: what an accepted update earns, with the components that explain it.

Rejected or late work earns nothing: credit is only ever computed for an accepted update.
"""

from __future__ import annotations

from typing import Any

from .config import CreditsParams

__all__ = ["credit_for"]


def credit_for(kind: str, tokens: int, policy: CreditsParams) -> tuple[float, dict[str, Any]]:
    """Amount and its components for ``tokens`` of accepted ``kind`` work."""
    rate = policy.train_per_1k_tokens if kind == "train" else policy.eval_per_1k_tokens
    amount = round(tokens / 1000.0 * rate, 6)
    return amount, {"kind": kind, "tokens": int(tokens), "rate_per_1k": rate}

"""The vocabulary of leases and verdicts, as ``StrEnum``s: each member *is* its ``str`` value,
so it is signed, sent and stored as that string, and compares equal to it. (Rejection reasons
are ``protocol.errors.Reason``.) No imports beyond the standard library: the ledger uses these
without loading Flower."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["KINDS", "Kind", "Verdict"]


class Kind(StrEnum):
    """What a lease asks for."""

    TRAIN = "train"
    EVAL = "eval"
    TASKS = "tasks"  # lm-eval tasks on a version (``training.evals``): an evaluation too


class Verdict(StrEnum):
    """What became of a reply."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


KINDS = tuple(k.value for k in Kind)

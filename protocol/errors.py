"""Typed errors shared by every ATOM package.

Each error carries a one-line message and an ``exit_code`` that CLIs return, so a
user sees ``error: <message>`` instead of a traceback for a mistake of theirs::

    AtomError(Exception)                       exit_code 1
    ├── ConfigError                            exit_code 2   (message names the bad key)
    ├── ProtocolError                          exit_code 3   (malformed record / message)
    ├── VerificationError(reason: str)         exit_code 4   (.reason is a Reason code)
    ├── EnrollmentError                        exit_code 5   (bad/used/expired token, CA mismatch)
    ├── CheckpointError                        exit_code 6   (corrupt / missing checkpoint)
    ├── LedgerError                            exit_code 7   (database unreachable, ...)
    ├── NetworkError                           exit_code 8   (coordinator unreachable, ...)
    └── BlobError                              exit_code 9   (a blob unknown, too large, corrupt
                                                              from every source, or unstorable)

``Reason`` holds the short codes with which the coordinator rejects an update; they
are stored in the ledger and shown in the TUI, so they never change spelling.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

__all__ = [
    "AtomError",
    "BlobError",
    "CheckpointError",
    "ConfigError",
    "EnrollmentError",
    "LedgerError",
    "NetworkError",
    "ProtocolError",
    "Reason",
    "VerificationError",
]


class AtomError(Exception):
    """Base of all ATOM errors; ``str(err)`` is always a single line."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        # Messages end up in logs, the ledger and terminal one-liners: keep them one line.
        self.message = " ".join(str(message).split())
        super().__init__(self.message)


class ConfigError(AtomError):
    """Invalid configuration; the message names the bad key."""

    exit_code = 2


class ProtocolError(AtomError):
    """A record or message that does not follow the wire format."""

    exit_code = 3


class VerificationError(AtomError):
    """An update that failed verification; ``reason`` is one of ``Reason``."""

    exit_code = 4

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class EnrollmentError(AtomError):
    """Enrollment failed: bad, used or expired token, CA mismatch, ..."""

    exit_code = 5


class CheckpointError(AtomError):
    """A checkpoint is corrupt, missing or does not match its digest."""

    exit_code = 6


class LedgerError(AtomError):
    """The ledger database is unreachable or inconsistent."""

    exit_code = 7


class NetworkError(AtomError):
    """The coordinator (or another peer) cannot be reached."""

    exit_code = 8


class BlobError(AtomError):
    """A content-addressed blob could not be had: unknown, over the size limit, corrupt from
    every source, or not storable (disk full). Nothing corrupt is ever kept."""

    exit_code = 9


class Reason(StrEnum):
    """Rejection reason codes (each member is its ``str`` value, as stored and sent)."""

    UNKNOWN_LEASE = "unknown_lease"
    BAD_SIGNATURE = "bad_signature"
    LEASE_MISMATCH = "lease_mismatch"
    STALE_BASE = "stale_base"
    DIGEST_MISMATCH = "digest_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"
    LATE = "late"
    MALFORMED = "malformed"
    METRICS_INCONSISTENT = "metrics_inconsistent"
    UNKNOWN_NODE = "unknown_node"
    BAD_ENCODING = "bad_encoding"  # a compressed update whose structure is not as declared
    # round-level checks (coordinator.verify.rules), judged once a round's replies are in
    DUPLICATE = "duplicate"
    NOT_USEFUL = "not_useful"
    SPOT_CHECK_MISMATCH = "spot_check_mismatch"
    BASE_MISMATCH = "base_mismatch"
    # eval: a window the coordinator recomputed (or a quorum partner's, then recomputed)
    # disagrees with what the reply committed to (coordinator.verify.eval_judge)
    EVAL_MISMATCH = "eval_mismatch"

    MISMATCHES: ClassVar[frozenset[str]]
    ALL: ClassVar[frozenset[str]]


# the rejections that prove a node sent results it did not compute: they cost credit
# (``[credits] mismatch_penalty``), weigh most against trust and start probation. Plain
# strings: they go into SQL ``IN`` lists as they are.
Reason.MISMATCHES = frozenset({Reason.SPOT_CHECK_MISMATCH.value, Reason.EVAL_MISMATCH.value})
Reason.ALL = frozenset(r.value for r in Reason)

from __future__ import annotations

import pytest

from protocol import errors
from protocol.errors import AtomError, ProtocolError, Reason, VerificationError

EXIT_CODES = {
    "AtomError": 1, "ConfigError": 2, "ProtocolError": 3, "VerificationError": 4,
    "EnrollmentError": 5, "CheckpointError": 6, "LedgerError": 7, "NetworkError": 8,
    "BlobError": 9,
}


@pytest.mark.parametrize(("name", "code"), EXIT_CODES.items())
def test_exit_codes_and_hierarchy(name: str, code: int) -> None:
    cls = getattr(errors, name)
    assert cls.exit_code == code
    assert issubclass(cls, AtomError)
    assert name in errors.__doc__


def test_messages_are_one_line() -> None:
    err = ProtocolError("first line\nsecond   line")
    assert str(err) == "first line second line"
    assert err.exit_code == 3


def test_verification_error_carries_reason() -> None:
    err = VerificationError(Reason.LATE, "received 3 s late")
    assert err.reason == "late"
    assert "received 3 s late" in str(err)


def test_reason_codes_match_the_contract() -> None:
    contract = {
        "unknown_lease", "bad_signature", "lease_mismatch", "stale_base", "digest_mismatch",
        "shape_mismatch", "non_finite", "norm_bound", "late", "malformed",
        "metrics_inconsistent", "unknown_node", "duplicate", "not_useful",
        "spot_check_mismatch", "base_mismatch", "eval_mismatch", "bad_encoding",
    }
    assert Reason.ALL == contract
    assert {getattr(Reason, c.upper()) for c in contract} == contract

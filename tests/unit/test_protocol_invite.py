from __future__ import annotations

import base64
import hashlib
import json

import pytest

from protocol.errors import EnrollmentError
from protocol.invite import InviteToken, hash_secret, new_secret

TOKEN = InviteToken(address="coord.example.edu:7443", secret="s3cret-~", ca_sha256="ab" * 32)


def test_round_trip_and_format() -> None:
    encoded = TOKEN.encode()
    assert encoded.startswith("atom1.") and "=" not in encoded
    body = encoded.removeprefix("atom1.")
    doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert doc == {"address": TOKEN.address, "secret": TOKEN.secret, "ca_sha256": TOKEN.ca_sha256}
    assert InviteToken.decode(encoded) == TOKEN
    assert InviteToken.decode(f"  {encoded}\n") == TOKEN  # pasted with whitespace


def _encode(doc: object) -> str:
    return "atom1." + base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()


@pytest.mark.parametrize("garbage", [
    "", "atom1.", "atom2." + TOKEN.encode()[6:], TOKEN.encode()[:-5] + "!!!!!", "atom1.%%%",
    _encode([1, 2]), _encode({"address": "a", "secret": "s"}),
    _encode({"address": "a", "secret": "s", "ca_sha256": "AB" * 32}),
    _encode({"address": "a", "secret": "", "ca_sha256": "ab" * 32}),
    _encode({"address": "a", "secret": 5, "ca_sha256": "ab" * 32}),
    _encode({"address": "a", "secret": "s", "ca_sha256": "ab" * 32, "x": 1}),
    "atom1." + base64.urlsafe_b64encode(b"\xff\xfe").decode(), "atom1." + "A" * 5000, None,
])
def test_decode_rejects_garbage(garbage: object) -> None:
    with pytest.raises(EnrollmentError, match="^invalid invite token$"):
        InviteToken.decode(garbage)  # type: ignore[arg-type]


def test_hash_secret_and_new_secret() -> None:
    assert hash_secret("abc") == hashlib.sha256(b"abc").hexdigest()
    a, b = new_secret(), new_secret()
    assert a != b and len(a) >= 43

"""Invite tokens: everything a node needs to enroll, in one copy-pasteable string.

``encode()`` gives ``"atom1." + base64url(JSON)`` without ``=`` padding, where the JSON
is ``{"address": ..., "ca_sha256": ..., "secret": ...}`` (sorted keys, no spaces). The
coordinator stores only ``hash_secret(secret)``; ``ca_sha256`` pins the coordinator's CA
certificate (hex SHA-256 of its DER bytes) so the first TLS connection can be trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass

from protocol._fields import HEX64
from protocol.errors import EnrollmentError

__all__ = ["INVITE_PREFIX", "InviteToken", "hash_secret", "new_secret"]

INVITE_PREFIX = "atom1."
_MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True)
class InviteToken:
    """Coordinator address, one-time enrollment secret and CA pin."""

    address: str  # host:port of the coordinator's enrollment service
    secret: str
    ca_sha256: str  # 64 lowercase hex

    def encode(self) -> str:
        """``atom1.<base64url JSON>``."""
        doc = json.dumps({"address": self.address, "ca_sha256": self.ca_sha256,
                          "secret": self.secret}, sort_keys=True, separators=(",", ":"))
        body = base64.urlsafe_b64encode(doc.encode("utf-8")).rstrip(b"=").decode("ascii")
        return INVITE_PREFIX + body

    @classmethod
    def decode(cls, s: str) -> InviteToken:
        """Parse a token; raises ``EnrollmentError("invalid invite token")`` on garbage."""
        try:
            s = s.strip()
            if not s.startswith(INVITE_PREFIX) or len(s) > _MAX_TOKEN_CHARS:
                raise ValueError
            body = s[len(INVITE_PREFIX):]
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, AttributeError, TypeError, binascii.Error):
            raise EnrollmentError("invalid invite token") from None
        fields = {"address", "secret", "ca_sha256"}
        if (not isinstance(doc, dict) or set(doc) != fields
                or not all(isinstance(doc[k], str) and doc[k] for k in fields)
                or HEX64.fullmatch(doc["ca_sha256"]) is None):
            raise EnrollmentError("invalid invite token")
        return cls(address=doc["address"], secret=doc["secret"], ca_sha256=doc["ca_sha256"])


def new_secret() -> str:
    """A fresh 256-bit URL-safe enrollment secret."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of the UTF-8 secret; secrets are random, so no slow KDF is needed."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()

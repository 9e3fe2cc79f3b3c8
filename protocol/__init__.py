"""ATOM Network wire protocol: messages, digests, signatures, invites, errors.

Pure Python + numpy + Flower records + grpc/protobuf + cryptography. This package must
never import torch, sqlmodel or textual (a test checks ``sys.modules``): nodes, the
coordinator and the TUI all depend on it.
"""

from __future__ import annotations

from protocol.digest import digest_arrays, digest_bytes
from protocol.errors import (
    AtomError,
    CheckpointError,
    ConfigError,
    EnrollmentError,
    LedgerError,
    NetworkError,
    ProtocolError,
    Reason,
    VerificationError,
)
from protocol.invite import InviteToken, hash_secret, new_secret
from protocol.messages import (
    KINDS,
    Lease,
    Update,
    UpdateMetrics,
    parse_reply,
    parse_work,
    reply_content,
    work_content,
)
from protocol.signing import (
    fingerprint,
    generate_key,
    load_private_key,
    load_public_key,
    public_key_openssh,
    public_key_pem,
    save_private_key,
    sign,
    sign_update,
    signed_bytes,
    verify,
    verify_update,
)

__all__ = [
    "KINDS",
    "AtomError",
    "CheckpointError",
    "ConfigError",
    "EnrollmentError",
    "InviteToken",
    "Lease",
    "LedgerError",
    "NetworkError",
    "ProtocolError",
    "Reason",
    "Update",
    "UpdateMetrics",
    "VerificationError",
    "digest_arrays",
    "digest_bytes",
    "fingerprint",
    "generate_key",
    "hash_secret",
    "load_private_key",
    "load_public_key",
    "new_secret",
    "parse_reply",
    "parse_work",
    "public_key_openssh",
    "public_key_pem",
    "reply_content",
    "save_private_key",
    "sign",
    "sign_update",
    "signed_bytes",
    "verify",
    "verify_update",
    "work_content",
]

"""ATOM Network wire protocol: messages, digests, signatures, invites, errors.

Pure Python + numpy + Flower records + grpc/protobuf + cryptography. This package must
never import torch, sqlmodel or textual (a test checks ``sys.modules``): nodes, the
coordinator and the TUI all depend on it.

The names below load on first use (PEP 562): ``import protocol.errors`` alone, as the
``training`` package does, imports neither Flower nor ``cryptography`` (~0.25 s, and packages
a training-only process such as a data-parallel rank does not need)."""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_WHERE = {
    "digest_arrays": "protocol.digest",
    "digest_bytes": "protocol.digest",
    "AtomError": "protocol.errors",
    "CheckpointError": "protocol.errors",
    "ConfigError": "protocol.errors",
    "EnrollmentError": "protocol.errors",
    "LedgerError": "protocol.errors",
    "NetworkError": "protocol.errors",
    "ProtocolError": "protocol.errors",
    "Reason": "protocol.errors",
    "VerificationError": "protocol.errors",
    "InviteToken": "protocol.invite",
    "hash_secret": "protocol.invite",
    "new_secret": "protocol.invite",
    "KINDS": "protocol.messages",
    "Lease": "protocol.messages",
    "Update": "protocol.messages",
    "UpdateMetrics": "protocol.messages",
    "parse_reply": "protocol.messages",
    "parse_work": "protocol.messages",
    "reply_content": "protocol.messages",
    "work_content": "protocol.messages",
    "fingerprint": "protocol.signing",
    "generate_key": "protocol.signing",
    "load_private_key": "protocol.signing",
    "load_public_key": "protocol.signing",
    "public_key_openssh": "protocol.signing",
    "public_key_pem": "protocol.signing",
    "save_private_key": "protocol.signing",
    "sign": "protocol.signing",
    "sign_update": "protocol.signing",
    "signed_bytes": "protocol.signing",
    "verify": "protocol.signing",
    "verify_update": "protocol.signing",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

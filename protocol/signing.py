r"""Node keys and update signatures (ECDSA P-384 over SHA-256, DER signatures).

What is signed — ``signed_bytes(update)`` is the only definition::

    b"atom-update-v1\n" + json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=True, allow_nan=False).encode("ascii")

    doc = {"arrays_digest": str, "node_id": int,
           "lease":   {run_id, round, shard_id, kind, base_version, base_digest, data_start,
                       data_end, data_digest, inner_steps, batch_size, seq_len, lr,
                       weight_decay, seed, deadline, nonce},
           "metrics": {tokens, steps, loss_before, loss_after, wall_s}}

The signature itself is not part of ``doc``. Rules a third party needs to rebuild it:
keys of every object sorted by code point, no whitespace at all; integers in plain
decimal; floats (lr, weight_decay, deadline, loss_before, loss_after, wall_s — always
floats, even when whole: ``1.0``) as Python's ``repr(float)``: the shortest string that
round-trips, positional for 1e-4 <= |x| < 1e16 (``0.001``, ``1700000000.5``) and
otherwise ``d.ddde±XX`` with at least two exponent digits (``1e-05``, ``1e+16``); NaN and
infinities cannot be signed; strings as JSON with every non-ASCII character written as
``\uXXXX`` (lowercase hex, surrogate pairs above U+FFFF). Example (abridged)::

    atom-update-v1
    {"arrays_digest":"9f86...","lease":{"base_digest":"...","base_version":3,...},
     "metrics":{"loss_after":2.5,...},"node_id":7}

Keys: Flower's SuperNode auth wants OpenSSH formats, so private keys are stored as
OpenSSH PEM (mode 0600); Flower reports registered keys as PEM SubjectPublicKeyInfo,
which is what ``verify``/``verify_update`` take.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import ConfigError, ProtocolError
from protocol.messages import Update

__all__ = [
    "SIGNING_PREFIX",
    "fingerprint",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "public_key_openssh",
    "public_key_pem",
    "save_private_key",
    "sign",
    "sign_update",
    "signed_bytes",
    "verify",
    "verify_update",
]

SIGNING_PREFIX = b"atom-update-v1\n"
_ALGORITHM = ec.ECDSA(hashes.SHA256())
AnyKey = ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey


def signed_bytes(update: Update) -> bytes:
    """The exact bytes a node signs for ``update`` (see the module docstring)."""
    try:
        doc = json.dumps(update.to_dict(), sort_keys=True, separators=(",", ":"),
                         ensure_ascii=True, allow_nan=False)
    except ValueError as exc:
        raise ProtocolError(f"update cannot be signed: {exc}") from None
    return SIGNING_PREFIX + doc.encode("ascii")


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 private key."""
    return ec.generate_private_key(ec.SECP384R1())


def save_private_key(key: ec.EllipticCurvePrivateKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as unencrypted OpenSSH PEM, mode 0600, atomically."""
    target = Path(path)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 from the start: the key is never readable by others.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read an EC private key (OpenSSH or PKCS#8/SEC1 PEM); ConfigError names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"private key {path} is not an unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"private key {path} is not an EC key")
    return key


def _public(key: AnyKey) -> ec.EllipticCurvePublicKey:
    return key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key


def public_key_pem(key: AnyKey) -> bytes:
    """PEM SubjectPublicKeyInfo of ``key`` (the form Flower's ``NodeInfo`` reports)."""
    return _public(key).public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_openssh(key: AnyKey) -> bytes:
    """One-line OpenSSH public key (``ecdsa-sha2-nistp384 AAAA...``) for Flower registration."""
    return _public(key).public_bytes(serialization.Encoding.OpenSSH,
                                     serialization.PublicFormat.OpenSSH)


def load_public_key(public_pem: bytes | str) -> ec.EllipticCurvePublicKey:
    """Parse a PEM SPKI EC public key; raises ``ProtocolError`` on anything else."""
    try:
        raw = public_pem.encode("ascii") if isinstance(public_pem, str) else bytes(public_pem)
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnicodeError):
        raise ProtocolError("public key is not a PEM SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProtocolError("public key is not an EC key")
    return key


def fingerprint(public_pem: bytes | str) -> str:
    """First 16 hex chars of SHA-256 over the DER SubjectPublicKeyInfo."""
    der = load_public_key(public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """DER ECDSA-SHA256 signature of ``data``."""
    return key.sign(data, _ALGORITHM)


def verify(public_pem: bytes | str, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is valid for ``data``; never raises on bad input."""
    try:
        load_public_key(public_pem).verify(bytes(signature), bytes(data), _ALGORITHM)
    except (InvalidSignature, ProtocolError, ValueError, TypeError):
        return False
    return True


def sign_update(update: Update, key: ec.EllipticCurvePrivateKey) -> Update:
    """Copy of ``update`` carrying a signature over ``signed_bytes(update)``."""
    return dataclasses.replace(update, signature=sign(key, signed_bytes(update)))


def verify_update(update: Update, public_pem: bytes | str) -> bool:
    """True iff ``update.signature`` was made over ``signed_bytes(update)`` by that key."""
    try:
        data = signed_bytes(update)
    except (ProtocolError, AttributeError, TypeError):
        return False
    return verify(public_pem, data, update.signature)

r"""Credit receipts: what the coordinator signs when it pays credit, and how anyone checks it.

What is signed — ``receipt_bytes(receipt)`` is the only definition::

    b"atom-receipt-v1\n" + json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=True, allow_nan=False).encode("ascii")

    doc = {"amount": float, "components": {...}, "coordinator_key_fingerprint": str,
           "data_manifest": str, "issued_at": float, "kind": "train"|"eval"|"tasks"|"penalty",
           "lease_nonce": str, "node_id": int, "round": int, "run_id": str,
           "shard_id": int, "tokens": int, "update_digest": str, "update_id": int}

Any receipt says which data its work was on: ``data_manifest`` is the lease's (the hex SHA-256
of the run's data manifest, ``training.manifest``: sources, licences, tokenizer, tokens), so a
credit can be traced to the licensed data it paid for. Receipts issued before the field
existed have no ``data_manifest`` key at all, and their bytes are exactly as they were signed:
they still verify. A receipt the coordinator issues now always carries it; a document with the
key present but not 64 lowercase hex is malformed.

A ``train``, ``eval`` or ``tasks`` (lm-eval tasks on a version) receipt pays accepted work (``amount`` >= 0, ``tokens`` the tokens
credited). A ``penalty`` receipt charges an update that lost a check against the coordinator's
recomputation (a train spot check, or eval windows): ``amount`` < 0, ``tokens`` 0, and its ``components`` say how
it was sized (``{"kind": "penalty", "reason", "tokens" claimed, "rate_per_1k", "factor"}``).

The canonical JSON follows ``protocol.signing``: keys sorted by code point at every level, no
whitespace, integers in plain decimal, ``amount`` and ``issued_at`` always floats written as
Python's ``repr(float)`` (``0.192``, ``1700000000.25``, ``1.0``), no NaN or infinity, every
non-ASCII character as ``\uXXXX``. Python's ``json.loads`` followed by the ``json.dumps`` above
gives back exactly these bytes, so a third party can rebuild them with the standard library
alone and check the signature (ECDSA over SHA-256, DER, the coordinator's P-384 key) with
``openssl dgst -sha256 -verify coordinator.pem -signature receipt.sig receipt.bin``.

``update_digest`` is the update's signed ``arrays_digest``; ``coordinator_key_fingerprint``
is ``protocol.signing.fingerprint`` of the signing key, so a receipt names the key it needs.

A node asks for its statement with a request signed by its own key over
``statement_request_bytes(node_id, timestamp)``: ``b"atom-statement-request-v1\n"`` +
canonical JSON ``{"node_id": int, "timestamp": float}``.

The coordinator seals each statement it hands out, so a saved one cannot lose a receipt
(a penalty, say) and still verify: it signs ``statement_seal_bytes`` =
``b"atom-statement-seal-v1\n"`` + canonical JSON ``{"issued_at": float, "node_id": int,
"receipts": int, "receipts_sha256": str, "run_id": str}``, where ``receipts_sha256`` is the
hex SHA-256 of the concatenated SHA-256 digests of each receipt's ``receipt_bytes``, in the
statement's order. A sealed statement is complete as of ``issued_at``; a later one may hold
more.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol._fields import HEX64, canonical_json, check_keys, normalise
from protocol.errors import ProtocolError, VerificationError
from protocol.messages import KINDS
from protocol.signing import fingerprint, public_key_pem, sign, verify

__all__ = [
    "PENALTY",
    "RECEIPT_KINDS",
    "RECEIPT_PREFIX",
    "REQUEST_PREFIX",
    "STATEMENT_FORMAT",
    "Receipt",
    "ReceiptReason",
    "SignedReceipt",
    "Statement",
    "receipt_bytes",
    "seal_statement",
    "sign_receipt",
    "statement_request_bytes",
    "statement_seal_bytes",
    "verify_receipt",
]

PENALTY = "penalty"
RECEIPT_KINDS = (*KINDS, PENALTY)
RECEIPT_PREFIX = b"atom-receipt-v1\n"
REQUEST_PREFIX = b"atom-statement-request-v1\n"
STATEMENT_FORMAT = "atom-statement-v2"  # v2: sealed (issued_at, seal)
SEAL_PREFIX = b"atom-statement-seal-v1\n"


class ReceiptReason:
    """Why ``verify_receipt`` refused a receipt (``VerificationError.reason``)."""

    BAD_SIGNATURE = "bad_signature"  # not signed by the pinned coordinator key
    WRONG_NODE = "wrong_node"  # a valid receipt, but made out to another node
    MALFORMED = "malformed"  # fields of the wrong type, NaN, ...


@dataclass(frozen=True)
class Receipt:
    """The coordinator's word that ``node_id`` earned ``amount`` for one accepted update, or
    (kind ``penalty``, ``amount`` < 0) paid it for one that lost a spot or eval check."""

    run_id: str
    node_id: int
    update_id: int  # the ledger's update row
    update_digest: str  # the update's signed arrays_digest
    lease_nonce: str
    round: int
    shard_id: int
    kind: str  # "train" | "eval" | "tasks" | "penalty"
    tokens: int
    amount: float
    components: dict[str, Any]  # why: {"kind", "tokens", "rate_per_1k"} (+ "reason", "factor")
    issued_at: float  # unix seconds
    coordinator_key_fingerprint: str
    # the lease's data_manifest; "" only for a receipt issued before receipts named one,
    # whose document has no such key (module docstring)
    data_manifest: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The signed document: numbers coerced to their declared types, fields checked."""
        doc: dict[str, Any] = normalise(self)
        if doc["data_manifest"] == "":
            del doc["data_manifest"]  # an old receipt: signed without the key
        elif HEX64.fullmatch(doc["data_manifest"]) is None:
            raise ProtocolError("receipt.data_manifest: must be 64 lowercase hex")
        if self.kind not in RECEIPT_KINDS:
            raise ProtocolError(f"receipt.kind: must be one of {RECEIPT_KINDS}, "
                                f"not {self.kind!r}")
        for name in ("amount", "issued_at"):
            if not math.isfinite(doc[name]):
                raise ProtocolError(f"receipt.{name}: must be finite")
        if (doc["amount"] < 0) != (self.kind == PENALTY):
            raise ProtocolError("receipt.amount: must be < 0 for a penalty and >= 0 otherwise")
        if not isinstance(self.components, Mapping):
            raise ProtocolError("receipt.components: expected an object")
        doc["components"] = json.loads(canonical_json(self.components))  # plain JSON or raise
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> Receipt:
        """Parse a receipt document strictly; raises ``ProtocolError`` naming the field."""
        if not isinstance(doc, Mapping):
            raise ProtocolError("receipt: expected an object")
        names = {f.name for f in dataclasses.fields(cls)}
        if "data_manifest" not in doc:  # issued before receipts named their data
            names.discard("data_manifest")
        elif doc["data_manifest"] == "":
            raise ProtocolError("receipt.data_manifest: must be 64 lowercase hex")
        check_keys(doc, names, "receipt")
        receipt = cls(**doc)
        receipt.to_dict()  # type checks
        return receipt


def receipt_bytes(receipt: Receipt) -> bytes:
    """The exact bytes the coordinator signs for ``receipt`` (see the module docstring)."""
    try:
        return RECEIPT_PREFIX + canonical_json(receipt.to_dict())
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"receipt cannot be signed: {exc}") from None


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    signature: bytes  # DER ECDSA-SHA256 over receipt_bytes(receipt)

    def to_dict(self) -> dict[str, Any]:
        return {"receipt": self.receipt.to_dict(),
                "signature": base64.b64encode(self.signature).decode("ascii")}

    @classmethod
    def from_dict(cls, doc: Any) -> SignedReceipt:
        if not isinstance(doc, Mapping):
            raise ProtocolError("signed receipt: expected an object")
        check_keys(doc, {"receipt", "signature"}, "signed receipt")
        if not isinstance(doc["signature"], str):
            raise ProtocolError("signed receipt.signature: expected base64 text")
        try:
            sig = base64.b64decode(doc["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("signed receipt.signature: not base64") from None
        return cls(Receipt.from_dict(doc["receipt"]), sig)


def sign_receipt(receipt: Receipt, key: ec.EllipticCurvePrivateKey) -> SignedReceipt:
    """Sign ``receipt`` with the coordinator key it names (ProtocolError if it names another)."""
    own = fingerprint(public_key_pem(key))
    if receipt.coordinator_key_fingerprint != own:
        raise ProtocolError(f"receipt names key {receipt.coordinator_key_fingerprint!r}, "
                            f"but the signing key is {own}")
    return SignedReceipt(receipt, sign(key, receipt_bytes(receipt)))


def verify_receipt(signed: SignedReceipt, coordinator_pem: bytes | str,
                   expected_node_id: int) -> None:
    """Return if ``signed`` was made by ``coordinator_pem`` for ``expected_node_id``.

    Raises
    ------
    VerificationError
        ``.reason`` is ``malformed``, ``bad_signature`` or ``wrong_node`` (checked in that
        order). A bad ``coordinator_pem`` is the caller's ProtocolError, not the receipt's.
    """
    pinned = fingerprint(coordinator_pem)
    try:
        receipt = signed.receipt
        data = receipt_bytes(receipt)
        sig = bytes(signed.signature)
    except (ProtocolError, AttributeError, TypeError) as exc:
        raise VerificationError(ReceiptReason.MALFORMED, str(exc)) from None
    if receipt.coordinator_key_fingerprint != pinned:
        raise VerificationError(ReceiptReason.BAD_SIGNATURE,
                                f"receipt names key {receipt.coordinator_key_fingerprint}, "
                                f"the pinned coordinator key is {pinned}")
    if not verify(coordinator_pem, data, sig):
        raise VerificationError(ReceiptReason.BAD_SIGNATURE,
                                f"signature does not verify with coordinator key {pinned}")
    if receipt.node_id != expected_node_id:
        raise VerificationError(ReceiptReason.WRONG_NODE,
                                f"receipt is made out to node {receipt.node_id}, "
                                f"not node {expected_node_id}")


def statement_request_bytes(node_id: int, timestamp: float) -> bytes:
    """The exact bytes a node signs to ask for its own statement."""
    if isinstance(node_id, bool) or not isinstance(node_id, int):
        raise ProtocolError("statement request: node_id must be an int")
    if not math.isfinite(float(timestamp)):
        raise ProtocolError("statement request: timestamp must be finite")
    return REQUEST_PREFIX + canonical_json({"node_id": node_id, "timestamp": float(timestamp)})


def statement_seal_bytes(node_id: int, run_id: str, issued_at: float,
                         receipts: Sequence[SignedReceipt]) -> bytes:
    """The exact bytes the coordinator signs to seal a statement (module docstring)."""
    if isinstance(node_id, bool) or not isinstance(node_id, int):
        raise ProtocolError("statement seal: node_id must be an int")
    if not math.isfinite(float(issued_at)):
        raise ProtocolError("statement seal: issued_at must be finite")
    digests = b"".join(hashlib.sha256(receipt_bytes(r.receipt)).digest() for r in receipts)
    return SEAL_PREFIX + canonical_json({
        "issued_at": float(issued_at), "node_id": node_id, "receipts": len(receipts),
        "receipts_sha256": hashlib.sha256(digests).hexdigest(), "run_id": str(run_id)})


@dataclass(frozen=True)
class Statement:
    """Every receipt of one node, as the coordinator hands it out (and ``--save`` keeps it),
    sealed by the coordinator at ``issued_at`` (``seal`` signs ``statement_seal_bytes``).

    ``coordinator_public_key_pem`` says which key the coordinator claims; verifiers use the
    key they pinned themselves, never this one.
    """

    node_id: int
    run_id: str
    receipts: list[SignedReceipt]
    coordinator_public_key_pem: str
    issued_at: float
    seal: bytes

    def seal_verifies(self, coordinator_pem: bytes | str) -> bool:
        """True if ``coordinator_pem`` sealed exactly these receipts, in this order."""
        try:
            data = statement_seal_bytes(self.node_id, self.run_id, self.issued_at,
                                        self.receipts)
        except (ProtocolError, AttributeError, TypeError, ValueError):
            return False
        return verify(coordinator_pem, data, self.seal)

    def to_json(self) -> str:
        doc = {"format": STATEMENT_FORMAT, "node_id": self.node_id, "run_id": self.run_id,
               "coordinator_public_key_pem": self.coordinator_public_key_pem,
               "issued_at": float(self.issued_at),
               "seal": base64.b64encode(self.seal).decode("ascii"),
               "receipts": [r.to_dict() for r in self.receipts]}
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Statement:
        """Parse a statement; ``ProtocolError`` names what is wrong (and which receipt)."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeError) as exc:
            raise ProtocolError(f"not a credit statement: invalid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != STATEMENT_FORMAT:
            raise ProtocolError(f"not a credit statement (format is not {STATEMENT_FORMAT!r})")
        check_keys(doc, {"format", "node_id", "run_id", "coordinator_public_key_pem",
                         "issued_at", "seal", "receipts"}, "statement")
        node_id, run_id, pem = doc["node_id"], doc["run_id"], doc["coordinator_public_key_pem"]
        if isinstance(node_id, bool) or not isinstance(node_id, int):
            raise ProtocolError("statement.node_id: expected int")
        if not isinstance(run_id, str) or not isinstance(pem, str):
            raise ProtocolError("statement: run_id and coordinator_public_key_pem are text")
        issued_at = doc["issued_at"]
        if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
            raise ProtocolError("statement.issued_at: expected a number")
        try:
            seal = base64.b64decode(doc["seal"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ProtocolError("statement.seal: not base64") from None
        if not isinstance(doc["receipts"], list):
            raise ProtocolError("statement.receipts: expected a list")
        receipts = []
        for i, raw in enumerate(doc["receipts"]):
            try:
                receipts.append(SignedReceipt.from_dict(raw))
            except ProtocolError as err:
                raise ProtocolError(f"{_name(raw, i)} is malformed: {err}") from None
        return cls(node_id, run_id, receipts, pem, float(issued_at), seal)


def seal_statement(node_id: int, run_id: str, receipts: Sequence[SignedReceipt],
                   key: ec.EllipticCurvePrivateKey, issued_at: float) -> Statement:
    """The coordinator's sealed statement of ``receipts`` for ``node_id``."""
    data = statement_seal_bytes(node_id, run_id, issued_at, receipts)
    return Statement(node_id, run_id, list(receipts), public_key_pem(key).decode(),
                     float(issued_at), sign(key, data))


def _name(raw: Any, index: int) -> str:
    """How to name a receipt that may not even parse: by update id if it has one."""
    try:
        update_id = raw["receipt"]["update_id"]
        if isinstance(update_id, int) and not isinstance(update_id, bool):
            return f"receipt for update {update_id}"
    except (TypeError, KeyError):
        pass
    return f"receipt #{index + 1} of the statement"

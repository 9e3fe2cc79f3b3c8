"""The credit policy: what an accepted update earns, with the components that explain it,
and the signed receipt that comes with every credit.

Rejected or late work earns nothing: credit is only ever computed for an accepted update
(the verifier rejects an answer past its deadline as ``late``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.messages import Lease, Update
from protocol.receipts import (
    RECEIPT_PREFIX, Receipt, SignedReceipt, receipt_bytes, sign_receipt,
)
from protocol.signing import fingerprint, load_private_key, public_key_pem

from .config import CreditsParams
from .ledger import CreditEntry, Ledger

__all__ = ["ReceiptIssuer", "credit_for", "pay_credit"]

log = logging.getLogger(__name__)


def credit_for(kind: str, tokens: int, policy: CreditsParams) -> tuple[float, dict[str, Any]]:
    """Amount and its components for ``tokens`` of accepted ``kind`` work."""
    rate = policy.train_per_1k_tokens if kind == "train" else policy.eval_per_1k_tokens
    amount = round(tokens / 1000.0 * rate, 6)
    return amount, {"kind": kind, "tokens": int(tokens), "rate_per_1k": rate}


@dataclass(frozen=True)
class ReceiptIssuer:
    """The coordinator key, loaded once per process, that signs every receipt."""

    key: ec.EllipticCurvePrivateKey
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(public_key_pem(self.key)))

    @classmethod
    def load(cls, key_path: str | os.PathLike[str]) -> ReceiptIssuer:
        """From the run directory's ``coordinator.key``; ConfigError names a bad file."""
        return cls(load_private_key(key_path))

    def issue(self, receipt: Receipt) -> SignedReceipt:
        return sign_receipt(receipt, self.key)


def pay_credit(ledger: Ledger, policy: CreditsParams, issuer: ReceiptIssuer | None, *,
               node_id: int, lease: Lease, update: Update, update_id: int, now: float
               ) -> tuple[CreditEntry, SignedReceipt | None]:
    """Credit one accepted update and, with an ``issuer``, store its signed receipt with it.

    Without an issuer (in-process tests of the run loop) the credit has no receipt and so
    appears in no node's statement.
    """
    tokens = update.metrics.tokens
    amount, components = credit_for(lease.kind, tokens, policy)
    signed = None
    if issuer is not None:
        signed = issuer.issue(Receipt(
            run_id=lease.run_id, node_id=node_id, update_id=update_id,
            update_digest=update.arrays_digest, lease_nonce=lease.nonce, round=lease.round,
            shard_id=lease.shard_id, kind=lease.kind, tokens=tokens, amount=amount,
            components=components, issued_at=now,
            coordinator_key_fingerprint=issuer.fingerprint))
    body = None if signed is None else (
        receipt_bytes(signed.receipt)[len(RECEIPT_PREFIX):].decode("ascii"), signed.signature)
    entry = ledger.add_credit(node_id, update_id, amount, components, now=now,
                              receipt=body)
    return entry, signed

"""The credit policy: what an accepted update earns, with the components that explain it,
what an update that lost a spot or eval check costs, and the signed receipt that comes with every
entry.

Rejected or late work earns nothing: credit is only ever computed for an accepted update
(the verifier rejects an answer past its deadline as ``late``). Two rejections cost more:
an update that lost a check (``spot_check_mismatch``: the coordinator's own recomputation of
the shard disagreed with it; ``eval_mismatch``: windows of an eval reply it recomputed did)
pays ``mismatch_penalty`` times what the shard would have earned. Spot checks are random, so without a price on being caught a node could
send half-done work and keep most of the credit; with the factor at least
1 / ``spot_check_rate`` such work loses credit in expectation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import Reason
from protocol.messages import Kind, Lease, Update
from protocol.receipts import (
    PENALTY, RECEIPT_PREFIX, Receipt, SignedReceipt, receipt_bytes, sign_receipt,
)
from protocol.signing import fingerprint, load_private_key, public_key_pem

from coordinator.config import CreditsParams
from coordinator.ledger import CreditEntry, Ledger

__all__ = ["ReceiptIssuer", "charge_penalty", "credit_for", "credit_owed", "pay_credit"]

log = logging.getLogger(__name__)


def credit_for(kind: str, tokens: int, policy: CreditsParams) -> tuple[float, dict[str, Any]]:
    """Amount and its components for ``tokens`` of accepted ``kind`` work."""
    rate = policy.train_per_1k_tokens if kind == Kind.TRAIN else policy.eval_per_1k_tokens
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
    return _enter(ledger.add_credit, issuer, node_id=node_id, lease=lease, update=update,
                  update_id=update_id, now=now, kind=lease.kind, tokens=tokens, amount=amount,
                  components=components)


def charge_penalty(ledger: Ledger, policy: CreditsParams, issuer: ReceiptIssuer | None, *,
                   node_id: int, lease: Lease, update: Update, update_id: int, now: float,
                   reason: str = Reason.SPOT_CHECK_MISMATCH
                   ) -> tuple[CreditEntry, SignedReceipt | None] | None:
    """Charge an update that lost a check (``reason``, one of ``Reason.MISMATCHES``)
    ``mismatch_penalty`` x the credit its claimed tokens of ``lease.kind`` work would have
    earned; None when the factor (or that credit) is 0."""
    claimed = update.metrics.tokens
    worth, parts = credit_for(lease.kind, claimed, policy)
    amount = -round(policy.mismatch_penalty * worth, 6)
    if amount == 0:
        return None
    components = {"kind": PENALTY, "reason": reason, "tokens": claimed,
                  "rate_per_1k": parts["rate_per_1k"], "factor": policy.mismatch_penalty}
    return _enter(ledger.add_penalty, issuer, node_id=node_id, lease=lease, update=update,
                  update_id=update_id, now=now, kind=PENALTY, tokens=0, amount=amount,
                  components=components)


def credit_owed(policy: CreditsParams, issuer: ReceiptIssuer | None, *, node_id: int,
                lease: Lease, update: Update, update_id: int, now: float
                ) -> tuple[float, dict[str, Any], tuple[str, bytes] | None]:
    """What ``pay_credit`` enters for one accepted update, for ``Ledger.record_updates``:
    the amount, its components and the signed receipt (body, signature) with an issuer."""
    tokens = update.metrics.tokens
    amount, components = credit_for(lease.kind, tokens, policy)
    signed = _sign(issuer, node_id=node_id, lease=lease, update=update, update_id=update_id,
                   now=now, kind=lease.kind, tokens=tokens, amount=amount,
                   components=components)
    return amount, components, _body(signed)


def _sign(issuer: ReceiptIssuer | None, *, node_id: int, lease: Lease, update: Update,
          update_id: int, now: float, kind: str, tokens: int, amount: float,
          components: dict[str, Any]) -> SignedReceipt | None:
    if issuer is None:
        return None
    return issuer.issue(Receipt(
        run_id=lease.run_id, node_id=node_id, update_id=update_id,
        update_digest=update.arrays_digest, lease_nonce=lease.nonce, round=lease.round,
        shard_id=lease.shard_id, kind=kind, tokens=tokens, amount=amount,
        components=components, issued_at=now, coordinator_key_fingerprint=issuer.fingerprint,
        data_manifest=lease.data_manifest))  # the data the work was on: every receipt says


def _body(signed: SignedReceipt | None) -> tuple[str, bytes] | None:
    """How the ledger stores a receipt: its canonical JSON and the signature."""
    return None if signed is None else (
        receipt_bytes(signed.receipt)[len(RECEIPT_PREFIX):].decode("ascii"), signed.signature)


def _enter(add: Callable[..., CreditEntry], issuer: ReceiptIssuer | None, *, node_id: int,
           lease: Lease, update: Update, update_id: int, now: float, kind: str, tokens: int,
           amount: float, components: dict[str, Any]
           ) -> tuple[CreditEntry, SignedReceipt | None]:
    """Sign the receipt (with an issuer) and ``add`` the entry with it in one transaction."""
    signed = _sign(issuer, node_id=node_id, lease=lease, update=update, update_id=update_id,
                   now=now, kind=kind, tokens=tokens, amount=amount, components=components)
    entry = add(node_id, update_id, amount, components, now=now, receipt=_body(signed))
    return entry, signed

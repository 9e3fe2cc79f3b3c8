"""Judging one reply: decode, verify, record the verdict, pay credit for accepted work.

Whatever a node sends, the outcome is a row in the ledger: hostile or broken input becomes a
rejection with its reason, never an exception that stops the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from protocol.errors import ProtocolError, Reason
from protocol.messages import Lease, Update, parse_reply

from .config import RunConfig
from .credits import ReceiptIssuer, pay_credit
from .ledger import Ledger
from .verifier import Expected, Verdict, verify

__all__ = ["Judged", "judge_reply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judged:
    verdict: Verdict
    update: Update | None
    arrays: dict[str, np.ndarray]


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _revoked(ledger: Ledger, node_id: int) -> bool:
    node = ledger.node(node_id)  # read now: a revocation during the run counts at once
    return node is None or bool(node.revoked)


def judge_reply(content: RecordDict, *, lease: Lease, lease_row_id: int, node_id: int,
                public_key_pem: bytes, version: int,
                shapes: dict[str, tuple[tuple[int, ...], str]], cfg: RunConfig,
                ledger: Ledger, now: float, issuer: ReceiptIssuer | None = None) -> Judged:
    try:
        update, arrays = parse_reply(content)
    except ProtocolError as err:
        verdict = Verdict(False, Reason.MALFORMED, str(err))
        ledger.record_update(lease_id=lease_row_id, node_id=node_id, arrays_digest="",
                             verdict="rejected", tokens=0, steps=0, loss_before=None,
                             loss_after=None, wall_s=None, reason=verdict.reason,
                             detail=verdict.detail, received_at=now)
        return Judged(verdict, None, {})
    verdict = verify(update, arrays, Expected(
        lease=lease, node_id=node_id, public_key_pem=public_key_pem, current_version=version,
        shapes=shapes if lease.kind == "train" else {},
        max_norm=cfg.verify.max_update_norm, now=now, revoked=_revoked(ledger, node_id)))
    m = update.metrics
    row = ledger.record_update(
        lease_id=lease_row_id, node_id=node_id, arrays_digest=update.arrays_digest,
        verdict="accepted" if verdict.accepted else "rejected", tokens=m.tokens, steps=m.steps,
        loss_before=_num(m.loss_before), loss_after=_num(m.loss_after), wall_s=_num(m.wall_s),
        reason=verdict.reason, detail=verdict.detail, norm=verdict.norm, received_at=now)
    if verdict.accepted:
        pay_credit(ledger, cfg.credits, issuer, node_id=node_id, lease=lease, update=update,
                   update_id=row.id, now=now)
    return Judged(verdict, update, arrays)

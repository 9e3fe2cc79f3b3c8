"""Judging one reply: decode, verify, record the verdict, pay credit for accepted work
(and charge the penalty for a lost spot or eval check).

Whatever a node sends, the outcome is a row in the ledger: hostile or broken input becomes a
rejection with its reason, never an exception that stops the run. The run loop screens every
reply with ``screen_reply`` as it arrives and records it with ``record_judged`` — at once if
it failed, else once its phase's checks have had their say (``coordinator.verify.round_judge`` for
train work, ``coordinator.verify.eval_judge`` for eval work). ``judge_reply`` does both at once,
without the phase checks (tests and fuzzing of the per-reply path).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import RecordDict

from protocol.blobstore import BlobDir
from protocol.digest import arrays_from_bytes
from protocol.errors import BlobError, ProtocolError, Reason
from protocol.messages import Kind, Lease, Update, Verdict, parse_reply

from coordinator import metrics
from coordinator.accounting.credits import (
    ReceiptIssuer, charge_penalty, credit_owed, pay_credit,
)
from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.ledger import UpdateRow
from coordinator.verify.reply import Expected, Ruling, verify

__all__ = ["Judged", "Verdicted", "finite_or_none", "judge_reply", "record_judged", "record_many",
           "screen_reply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judged:
    verdict: Ruling
    update: Update | None
    arrays: dict[str, np.ndarray]


def finite_or_none(x: float) -> float | None:
    """A reported metric as the ledger stores it: None for NaN or infinity."""
    return x if math.isfinite(x) else None


def _revoked(ledger: Ledger, node_id: int) -> bool:
    node = ledger.node(node_id)  # read now: a revocation during the run counts at once
    return node is None or bool(node.revoked)


def _count(lease: Lease, verdict: Ruling, update: Update | None) -> None:
    metrics.UPDATES.labels(lease.kind, Verdict.ACCEPTED if verdict.accepted
                           else Verdict.REJECTED, verdict.reason or "").inc()
    if verdict.accepted and update is not None:
        metrics.TOKENS_ACCEPTED.labels(lease.kind).inc(update.metrics.tokens)


def screen_reply(content: RecordDict, *, lease: Lease, node_id: int, public_key_pem: bytes,
                 version: int, shapes: dict[str, tuple[tuple[int, ...], str]], cfg: RunConfig,
                 ledger: Ledger, now: float, blobs: BlobDir | None = None,
                 max_staleness: int = 0, revoked: bool | None = None) -> Judged:
    """Decode and ``verify`` one reply against ``version`` (a base up to ``max_staleness``
    versions behind it passes); records nothing. A train reply's payload comes from
    ``blobs`` (the node uploaded it under the digest its signed update names) unless it came
    inline; its arrays come back decoded from the run's ``[compression]`` (the signature
    covers the encoding). ``revoked``: whether the node is revoked, as the caller read it
    for many replies at once (None: read here)."""
    try:
        update, arrays = parse_reply(content)
    except ProtocolError as err:
        return Judged(Ruling(False, Reason.MALFORMED, str(err)), None, {})
    train = lease.kind == Kind.TRAIN
    from_store = train and not arrays and blobs is not None
    if from_store:
        try:
            arrays = arrays_from_bytes(blobs.view(update.arrays_digest))
        except (BlobError, ProtocolError) as err:
            return Judged(Ruling(False, Reason.MALFORMED, f"update payload: {err}"), update, {})
    verdict = verify(update, arrays, Expected(
        lease=lease, node_id=node_id, public_key_pem=public_key_pem, current_version=version,
        shapes=shapes if train else {}, max_norm=cfg.verify.max_update_norm, now=now,
        revoked=_revoked(ledger, node_id) if revoked is None else revoked, compression=cfg.codec() if train else None,
        from_store=from_store, max_staleness=max_staleness))
    return Judged(verdict, update, verdict.arrays if verdict.arrays is not None else arrays)


def record_judged(judged: Judged, *, lease: Lease, lease_row_id: int, node_id: int,
                  node_name: str, cfg: RunConfig, ledger: Ledger, now: float,
                  issuer: ReceiptIssuer | None = None,
                  improvement: float | None = None) -> UpdateRow:
    """Record the verdict on one reply (received at ``now``): the update row, a "reject"
    event for a rejection, the credit and receipt for accepted work, the penalty for a lost
    check. The one place any of these is written, whichever stage decided the verdict."""
    verdict, update = judged.verdict, judged.update
    _count(lease, verdict, update)
    # one transaction: no crash leaves a verdict without its credit, receipt or event
    with ledger.atomic("record a verdict"):
        if not verdict.accepted:
            ledger.add_event("reject", _reject_message(node_name, verdict), node_id=node_id)
        if update is None:
            return ledger.record_update(lease_id=lease_row_id, node_id=node_id, arrays_digest="",
                                        verdict=Verdict.REJECTED.value, tokens=0, steps=0,
                                        loss_before=None, loss_after=None, wall_s=None,
                                        reason=verdict.reason,
                                        detail=verdict.detail, received_at=now)
        row = ledger.record_update(**_update_row(judged, lease_row_id, node_id, now, improvement))
        if verdict.accepted:
            pay_credit(ledger, cfg.credits, issuer, node_id=node_id, lease=lease, update=update,
                       update_id=row.id, now=now)
        elif verdict.reason in Reason.MISMATCHES:
            charge_penalty(ledger, cfg.credits, issuer, node_id=node_id, lease=lease,
                           update=update, update_id=row.id, now=now, reason=verdict.reason)
        return row


def _update_row(judged: Judged, lease_row_id: int, node_id: int, now: float,
                improvement: float | None) -> dict[str, Any]:
    """``Ledger.record_update``'s arguments for a verdict on a parsed update."""
    verdict, update = judged.verdict, judged.update
    assert update is not None
    m = update.metrics
    return dict(lease_id=lease_row_id, node_id=node_id, arrays_digest=update.arrays_digest,
                verdict=(Verdict.ACCEPTED if verdict.accepted else Verdict.REJECTED).value,
                tokens=m.tokens, steps=m.steps, loss_before=finite_or_none(m.loss_before),
                loss_after=finite_or_none(m.loss_after), wall_s=finite_or_none(m.wall_s), reason=verdict.reason,
                detail=verdict.detail, norm=verdict.norm, improvement=improvement,
                received_at=now)


def _reject_message(node_name: str, verdict: Ruling) -> str:
    return f"{node_name}: {verdict.reason} — {verdict.detail}"


@dataclass(frozen=True)
class Verdicted:
    """One reply's verdict with what ``record_judged`` records it by."""

    judged: Judged
    lease: Lease
    lease_row_id: int
    node_id: int
    node_name: str
    now: float
    improvement: float | None = None


def record_many(items: Sequence[Verdicted], *, cfg: RunConfig, ledger: Ledger,
                issuer: ReceiptIssuer | None = None) -> None:
    """``record_judged`` for each item, in one transaction and a few statements for all
    (``Ledger.record_updates``): an outer step's verdicts. The same rows, credits, receipts
    and events; an update that owes a penalty (rare) goes through ``record_judged``."""
    with ledger.atomic("record verdicts"):
        batch = [x for x in items if x.judged.update is not None and (
            x.judged.verdict.accepted or x.judged.verdict.reason not in Reason.MISMATCHES)]
        rows, events = [], []
        for x in batch:
            verdict = x.judged.verdict
            _count(x.lease, verdict, x.judged.update)
            rows.append(_update_row(x.judged, x.lease_row_id, x.node_id, x.now, x.improvement))
            if not verdict.accepted:
                events.append(dict(kind="reject", node_id=x.node_id, at=None,
                                   message=_reject_message(x.node_name, verdict)))

        def owed(i: int, update_id: int) -> tuple[float, dict, tuple[str, bytes] | None] | None:
            x = batch[i]
            if not x.judged.verdict.accepted:
                return None
            assert x.judged.update is not None
            return credit_owed(cfg.credits, issuer, node_id=x.node_id, lease=x.lease,
                               update=x.judged.update, update_id=update_id, now=x.now)

        ledger.record_updates(rows, owed, events)
        taken = {id(x) for x in batch}
        for x in items:
            if id(x) not in taken:
                record_judged(x.judged, lease=x.lease, lease_row_id=x.lease_row_id,
                              node_id=x.node_id, node_name=x.node_name, cfg=cfg, ledger=ledger,
                              now=x.now, issuer=issuer, improvement=x.improvement)


def judge_reply(content: RecordDict, *, lease: Lease, lease_row_id: int, node_id: int,
                public_key_pem: bytes, version: int,
                shapes: dict[str, tuple[tuple[int, ...], str]], cfg: RunConfig,
                ledger: Ledger, now: float, issuer: ReceiptIssuer | None = None,
                blobs: BlobDir | None = None) -> Judged:
    """Screen one reply and record its verdict at once (no round-level checks)."""
    judged = screen_reply(content, lease=lease, node_id=node_id, public_key_pem=public_key_pem,
                          version=version, shapes=shapes, cfg=cfg, ledger=ledger, now=now,
                          blobs=blobs)
    node = ledger.node(node_id)
    record_judged(judged, lease=lease, lease_row_id=lease_row_id, node_id=node_id,
                  node_name=node.name if node is not None else f"node {node_id}", cfg=cfg,
                  ledger=ledger, now=now, issuer=issuer)
    return judged

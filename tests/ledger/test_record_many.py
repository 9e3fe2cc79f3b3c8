"""``record_many`` (an outer step's verdicts in a few statements) records what
``record_judged`` (one verdict at a time) records: the same update rows, leases closed, credits
with verifiable receipts, reject events and penalties — on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.verify.record import Judged, Verdicted, record_judged, record_many
from coordinator.verify.reply import Ruling
from protocol.errors import LedgerError, Reason
from protocol.messages import Lease, Update, UpdateMetrics
from protocol.signing import generate_key

from tests.ledger.conftest import Make

CASES = [(True, None, "accepted (norm 1)"), (False, Reason.NOT_USEFUL, "no better"),
         (True, None, "accepted (norm 2)"), (False, Reason.SPOT_CHECK_MISMATCH, "lost a check"),
         (False, Reason.NORM_BOUND, "too big")]


def _items(make: Make, inst_id: int, tag: str) -> list[Verdicted]:
    items = []
    for i, (ok, reason, detail) in enumerate(CASES):
        node = make.node(inst_id, name=f"{tag}-{i}")
        row = make.lease(node.id)
        lease = Lease(run_id="run-1", round=1, shard_id=row.shard_id, kind="train",
                      base_version=0, base_digest="0" * 64, data_digest="1" * 64,
                      tokenizer_digest="7" * 64, data_manifest="8" * 64,
                      data_start=row.data_start, data_end=row.data_end, seq_len=32,
                      batch_size=2, inner_steps=3, lr=0.01, weight_decay=0.0, seed=7,
                      nonce=row.nonce,
                      deadline=200.0)
        update = Update(lease, node.id, f"{i:02d}" * 32, UpdateMetrics(
            tokens=192, steps=3, loss_before=5.0, loss_after=4.0 - i, wall_s=1.0 + i))
        items.append(Verdicted(Judged(Ruling(ok, reason, detail, 1.0 + i), update,
                                      {"w": np.zeros(2, np.float32)}),
                               lease, row.id, node.id, node.name, 150.0 + i,
                               0.1 * i if ok else None))
    return items


def _shape(ledger: Ledger, items: list[Verdicted]) -> list[tuple]:
    """What was recorded for each item, without the ids that differ between the two runs."""
    out = []
    for x in items:
        (upd,) = ledger.updates(node_id=x.node_id)
        credits = ledger.credits(node_id=x.node_id)
        receipts = ledger.receipts(node_id=x.node_id)
        events = [e.message.split(": ", 1)[1] for e in ledger.events()
                  if e.node_id == x.node_id and e.kind == "reject"]
        lease = ledger.lease(x.lease_row_id)
        out.append((upd.verdict, upd.reason, upd.detail, upd.tokens, upd.loss_after,
                    upd.wall_s, upd.norm, upd.improvement, upd.received_at, lease.status,
                    lease.closed_at, [(c.amount, json.loads(c.components), c.created_at,
                                       c.update_id == upd.id) for c in credits],
                    [(json.loads(r.body)["update_id"] == upd.id, json.loads(r.body)["amount"],
                      bool(r.signature)) for r in receipts], events))
    return out


@pytest.mark.parametrize("issued", [False, True])
def test_a_batch_records_what_one_at_a_time_records(ledger: Ledger, make: Make, inst,
                                                   issued: bool) -> None:
    cfg = RunConfig()
    key = generate_key()
    issuer = ReceiptIssuer(key) if issued else None
    singly, batch = _items(make, inst.id, "one"), _items(make, inst.id, "many")
    for x in singly:
        record_judged(x.judged, lease=x.lease, lease_row_id=x.lease_row_id, node_id=x.node_id,
                      node_name=x.node_name, cfg=cfg, ledger=ledger, now=x.now, issuer=issuer,
                      improvement=x.improvement)
    record_many(batch, cfg=cfg, ledger=ledger, issuer=issuer)
    assert _shape(ledger, batch) == _shape(ledger, singly)
    got = _shape(ledger, batch)
    assert [g[0] for g in got] == ["accepted", "rejected", "accepted", "rejected", "rejected"]
    assert got[3][11][0][0] < 0  # the lost check paid its penalty
    assert len(ledger.receipts()) == (6 if issued else 0)  # 2 credits + 1 penalty, twice


def test_a_batch_naming_an_unknown_lease_records_nothing(ledger: Ledger, make: Make,
                                                        inst) -> None:
    items = _items(make, inst.id, "x")
    items[2] = Verdicted(items[2].judged, items[2].lease, 10_000, items[2].node_id,
                         items[2].node_name, items[2].now)
    with pytest.raises(LedgerError, match="no lease 10000"):
        record_many(items, cfg=RunConfig(), ledger=ledger)
    assert ledger.updates() == [] and ledger.credits() == []


def test_a_big_batchs_credits_are_entered_in_update_order(ledger: Ledger, make: Make,
                                                           inst) -> None:
    """The credits are signed on threads (``ledger._SIGNERS``), in interleaved slices: they
    are still entered in the order of their updates, each receipt with its own credit."""
    from coordinator.ledger import ledger as ledger_module

    slices = ledger_module._SIGNERS * 4
    items = [x for k in range(2 * slices) for x in _items(make, inst.id, f"b{k}")]
    record_many(items, cfg=RunConfig(), ledger=ledger, issuer=ReceiptIssuer(generate_key()))
    credits = sorted(ledger.credits(), key=lambda c: c.id)
    paid = [c for c in credits if c.amount > 0]
    assert len(paid) == 2 * len(items) // 5  # two accepted of every five
    assert [c.update_id for c in paid] == sorted(c.update_id for c in paid)
    by_credit = {r.credit_id: json.loads(r.body) for r in ledger.receipts()}
    for c in paid:
        body = by_credit[c.id]
        assert (body["update_id"], body["amount"]) == (c.update_id, c.amount)

"""Credit receipts in the ledger: stored with their credit, read back exactly, on both backends."""

from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import create_engine
from sqlmodel import SQLModel

from coordinator.accounting.credits import ReceiptIssuer, pay_credit
from coordinator.accounting.statements import signed_receipt
from coordinator.config import CreditsParams
from coordinator.ledger import CreditReceipt, Ledger
from coordinator.ledger.models import TABLES
from protocol.errors import LedgerError
from protocol.messages import Lease, Update, UpdateMetrics
from protocol.receipts import receipt_bytes, verify_receipt
from protocol.signing import generate_key, public_key_pem, sign


@pytest.fixture
def node(ledger: Ledger, inst, make):
    return make.node(inst.id)


def _body(node_id: int, update_id: int, amount: float) -> str:
    return json.dumps({"node_id": node_id, "update_id": update_id, "amount": amount})


def test_credit_with_receipt(ledger: Ledger, inst, make, node) -> None:
    upd = make.answer(make.lease(node.id))
    entry = ledger.add_credit(node.id, upd.id, 1.024, {"kind": "train"}, now=300.0,
                              receipt=(_body(node.id, upd.id, 1.024), b"\x30\x01sig"))
    (row,) = ledger.receipts()
    assert isinstance(row, CreditReceipt)
    assert (row.credit_id, row.node_id, row.update_id) == (entry.id, node.id, upd.id)
    assert json.loads(row.body)["amount"] == 1.024 and row.created_at == 300.0
    assert base64.b64decode(row.signature) == b"\x30\x01sig"
    assert ledger.receipts(node_id=node.id) == [row]
    assert ledger.receipts(node_id=node.id + 1) == []
    # a credit without a receipt is still possible (in-process run loops without a key)
    other = make.answer(make.lease(node.id))
    ledger.add_credit(node.id, other.id, 1.0, {})
    assert len(ledger.credits()) == 2 and len(ledger.receipts()) == 1


@pytest.mark.parametrize("body", [
    "not json", "[1]", json.dumps({"node_id": 1}),
    "WRONG_AMOUNT", "WRONG_NODE", "WRONG_UPDATE",
])
def test_receipt_that_does_not_match_its_credit_is_refused(ledger: Ledger, make, node,
                                                           body: str) -> None:
    upd = make.answer(make.lease(node.id))
    body = {"WRONG_AMOUNT": _body(node.id, upd.id, 2.0),
            "WRONG_NODE": _body(node.id + 1, upd.id, 1.0),
            "WRONG_UPDATE": _body(node.id, upd.id + 1, 1.0)}.get(body, body)
    with pytest.raises(LedgerError, match=f"^receipt for update {upd.id} "):
        ledger.add_credit(node.id, upd.id, 1.0, {}, receipt=(body, b"s"))
    assert ledger.credits() == [] and ledger.receipts() == []


def test_refused_credit_leaves_no_receipt(ledger: Ledger, make, node) -> None:
    upd = make.answer(make.lease(node.id))
    ledger.add_credit(node.id, upd.id, 1.0, {}, receipt=(_body(node.id, upd.id, 1.0), b"a"))
    with pytest.raises(LedgerError, match="already credited"):
        ledger.add_credit(node.id, upd.id, 1.0, {}, receipt=(_body(node.id, upd.id, 1.0), b"b"))
    rejected = make.answer(make.lease(node.id), verdict="rejected", reason="late")
    with pytest.raises(LedgerError, match="rejected"):
        ledger.add_credit(node.id, rejected.id, 1.0, {},
                          receipt=(_body(node.id, rejected.id, 1.0), b"c"))
    assert [base64.b64decode(r.signature) for r in ledger.receipts()] == [b"a"]


def test_signed_receipt_round_trips_exactly(ledger: Ledger, make, node) -> None:
    key = generate_key()
    row = make.lease(node.id, kind="eval")
    upd = make.answer(row, tokens=777)
    lease = Lease(run_id=row.run_id, round=row.round, shard_id=row.shard_id, kind="eval",
                  base_version=0, base_digest="a" * 64, data_start=row.data_start,
                  data_end=row.data_end, data_digest="b" * 64, inner_steps=1, batch_size=1,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  seq_len=8, lr=0.001, weight_decay=0.0, seed=1, deadline=row.deadline,
                  nonce=row.nonce)
    update = Update(lease=lease, node_id=node.id, arrays_digest="ab" * 32,
                    metrics=UpdateMetrics(777, 0, 3.5, 3.5, 0.1))
    policy = CreditsParams(train_per_1k_tokens=1.0, eval_per_1k_tokens=0.3)
    entry, signed = pay_credit(ledger, policy, ReceiptIssuer(key), node_id=node.id,
                               lease=lease, update=update, update_id=upd.id,
                               now=1_700_000_000.123456)
    assert signed is not None and entry.amount == signed.receipt.amount == round(0.777 * 0.3, 6)
    (stored,) = ledger.receipts(node_id=node.id)
    back = signed_receipt(stored)
    assert back == signed and receipt_bytes(back.receipt) == receipt_bytes(signed.receipt)
    verify_receipt(back, public_key_pem(key), node.id)
    assert back.receipt.components == entry.components_dict() == {
        "kind": "eval", "tokens": 777, "rate_per_1k": 0.3}
    # the receipt names the data its work was on: the lease's data manifest
    assert back.receipt.data_manifest == lease.data_manifest
    assert json.loads(stored.body)["data_manifest"] == "8" * 64


def test_a_receipt_stored_before_data_manifests_still_verifies(ledger: Ledger, make,
                                                               node) -> None:
    """A ledger's receipt from before receipts named their data: its body has no
    ``data_manifest`` and verifies as it was signed."""
    key = ReceiptIssuer(generate_key())
    upd = make.answer(make.lease(node.id))
    doc = {"amount": 1.0, "components": {"kind": "train", "rate_per_1k": 1.0, "tokens": 1000},
           "coordinator_key_fingerprint": key.fingerprint, "issued_at": 5.0, "kind": "train",
           "lease_nonce": "cd" * 16, "node_id": node.id, "round": 1, "run_id": "r",
           "shard_id": 0, "tokens": 1000, "update_digest": "ab" * 32, "update_id": upd.id}
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    ledger.add_credit(node.id, upd.id, 1.0, doc["components"], now=5.0,
                      receipt=(body, sign(key.key, b"atom-receipt-v1\n" + body.encode())))
    (stored,) = ledger.receipts(node_id=node.id)
    back = signed_receipt(stored)
    assert back.receipt.data_manifest == ""
    verify_receipt(back, public_key_pem(key.key), node.id)


def test_ledger_made_before_receipts_gains_the_table(ledger_url: str, open_ledger) -> None:
    engine = create_engine(ledger_url)
    try:
        old = [t for t in TABLES if t.name != "credit_receipts"]
        SQLModel.metadata.create_all(engine, tables=old)
    finally:
        engine.dispose()
    assert open_ledger().receipts() == []
    assert open_ledger(read_only=True).receipts() == []


def test_read_only_ledger_reads_receipts_and_refuses_them(open_ledger, make, node) -> None:
    writer = make.ledger
    upd = make.answer(make.lease(node.id))
    writer.add_credit(node.id, upd.id, 1.0, {}, receipt=(_body(node.id, upd.id, 1.0), b"s"))
    ro = open_ledger(read_only=True)
    assert len(ro.receipts(node_id=node.id)) == 1
    other = make.answer(make.lease(node.id))
    with pytest.raises(LedgerError, match="read-only"):
        ro.add_credit(node.id, other.id, 1.0, {}, receipt=(_body(node.id, other.id, 1.0), b"s"))


def test_a_penalty_only_for_an_update_that_lost_a_spot_check(ledger: Ledger, make,
                                                             node) -> None:
    lost = make.answer(make.lease(node.id), verdict="rejected", reason="spot_check_mismatch")
    entry = ledger.add_penalty(node.id, lost.id, -1.92, {"kind": "penalty"}, now=5.0,
                               receipt=(_body(node.id, lost.id, -1.92), b"p"))
    assert (entry.amount, entry.update_id) == (-1.92, lost.id)
    assert [r.update_id for r in ledger.receipts(node_id=node.id)] == [lost.id]
    [summary] = [s for s in ledger.node_summaries() if s.node_id == node.id]
    assert summary.credits == pytest.approx(-1.92)
    with pytest.raises(LedgerError, match="already credited"):
        ledger.add_penalty(node.id, lost.id, -1.0, {})
    late = make.answer(make.lease(node.id), verdict="rejected", reason="late")
    paid = make.answer(make.lease(node.id))
    for upd in (late, paid):
        with pytest.raises(LedgerError, match="did not lose a spot or eval check"):
            ledger.add_penalty(node.id, upd.id, -1.0, {})
    for amount in (0.0, 1.0, float("nan")):
        with pytest.raises(LedgerError, match="penalty must be finite and < 0"):
            ledger.add_penalty(node.id, lost.id, amount, {})
    with pytest.raises(LedgerError, match="amount must be finite and >= 0"):
        ledger.add_credit(node.id, paid.id, -1.0, {})
    with pytest.raises(LedgerError, match="was rejected"):  # credit for it: still refused
        ledger.add_credit(node.id, lost.id, 1.0, {})
    assert len(ledger.credits()) == 1

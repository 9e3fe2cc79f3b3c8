"""Leases, updates, credit, model versions and events."""

from __future__ import annotations

import math

import pytest

from coordinator.ledger import Ledger
from protocol.errors import LedgerError


@pytest.fixture
def node(ledger: Ledger, inst, make):
    return make.node(inst.id)


def test_record_and_query_leases(ledger: Ledger, inst, make, node) -> None:
    other = make.node(inst.id)
    a = make.lease(node.id, nonce="a" * 32)
    b = make.lease(node.id, kind="eval")
    c = make.lease(other.id)
    assert (a.status, a.closed_at, a.kind) == ("issued", None, "train")
    assert (a.issued_at, a.deadline) == (100.0, 200.0)
    assert ledger.lease(a.id) == a and ledger.lease(999) is None
    assert ledger.lease_by_nonce("a" * 32) == a and ledger.lease_by_nonce("b" * 32) is None
    assert [x.id for x in ledger.leases()] == [a.id, b.id, c.id]
    assert [x.id for x in ledger.leases(node_id=node.id)] == [a.id, b.id]
    assert ledger.close_lease(b.id, "expired", now=201.0)
    assert [x.id for x in ledger.open_leases()] == [a.id, c.id]
    assert [x.id for x in ledger.leases(node_id=node.id, status="expired")] == [b.id]
    assert ledger.lease(b.id).closed_at == 201.0


def test_lease_refusals(ledger: Ledger, make, node) -> None:
    lease = make.lease(node.id, nonce="n" * 32)
    with pytest.raises(LedgerError):
        make.lease(node.id, nonce="n" * 32)  # nonces are unique
    with pytest.raises(LedgerError, match="lease kind"):
        make.lease(node.id, kind="infer")
    with pytest.raises(LedgerError):
        make.lease(999)  # unknown node
    with pytest.raises(LedgerError, match="closes as one of"):
        ledger.close_lease(lease.id, "issued", now=1.0)
    with pytest.raises(LedgerError, match="no lease 999"):
        ledger.close_lease(999, "failed", now=1.0)
    assert ledger.close_lease(lease.id, "failed", now=1.0)
    assert not ledger.close_lease(lease.id, "expired", now=2.0)  # first close wins
    assert (ledger.lease(lease.id).status, ledger.lease(lease.id).closed_at) == ("failed", 1.0)


def test_many_leases_in_one_statement_are_the_rows_one_at_a_time_would_be(
        ledger: Ledger, inst, make, node) -> None:
    other = make.node(inst.id)
    one = ledger.record_lease(run_id="r", round=1, shard_id=0, kind="train", node_id=node.id,
                              base_version=0, nonce="0" * 32, data_start=0, data_end=10,
                              deadline=200.0, issued_at=100.0)
    rows = [dict(run_id="r", round=1, shard_id=i, kind=kind, node_id=n.id, base_version=0,
                 nonce=f"{i + 1:032x}", data_start=10 * i, data_end=10 * i + 10,
                 deadline=200.0, issued_at=100.0)
            for i, (n, kind) in enumerate([(other, "train"), (node, "eval"), (other, "eval")])]
    ids = ledger.record_leases(rows)
    assert len(ids) == 3 and ids[0] > one.id and ids == sorted(ids)
    for i, row in zip(ids, rows):
        got = ledger.lease(i)
        assert (got.nonce, got.node_id, got.kind, got.shard_id, got.status, got.issued_at) == (
            row["nonce"], row["node_id"], row["kind"], row["shard_id"], "issued", 100.0)
    assert ledger.record_leases([]) == []
    before = len(ledger.leases())
    with pytest.raises(LedgerError):  # a nonce already used: none of the batch is recorded
        ledger.record_leases([dict(rows[0], nonce="f" * 32), dict(rows[1])])
    with pytest.raises(LedgerError, match="lease kind"):
        ledger.record_leases([dict(rows[0], nonce="e" * 32, kind="infer")])
    # more rows than one statement takes (several statements, in one transaction), and as
    # many as one statement takes (none around it on PostgreSQL): all or nothing either way
    for n in (1_001, 1_000):
        many = [dict(rows[0], shard_id=i, nonce=f"{n:04d}{i:028x}") for i in range(n - 1)]
        with pytest.raises(LedgerError):
            ledger.record_leases([*many, dict(rows[2])])  # the last one's nonce is taken
    assert len(ledger.leases()) == before
    assert len(ledger.record_leases(many)) == 999


def test_record_update_answers_its_lease(ledger: Ledger, make, node) -> None:
    lease = make.lease(node.id)
    upd = ledger.record_update(
        lease_id=lease.id, node_id=node.id, arrays_digest="cd" * 32, verdict="accepted",
        tokens=4096, steps=8, loss_before=5.25, loss_after=4.75, wall_s=2.5, norm=0.125,
        detail="ok", received_at=160.0,
    )
    assert upd.id is not None and upd.reason is None
    assert (upd.tokens, upd.steps, upd.loss_before, upd.loss_after, upd.wall_s, upd.norm) == (
        4096, 8, 5.25, 4.75, 2.5, 0.125)
    assert ledger.updates() == [upd] and ledger.updates(node_id=node.id) == [upd]
    assert ledger.updates(node_id=node.id + 1) == []
    closed = ledger.lease(lease.id)
    assert (closed.status, closed.closed_at) == ("answered", 160.0)
    assert ledger.open_leases() == []
    with pytest.raises(LedgerError):
        make.answer(lease)  # one update per lease


def test_late_update_keeps_expired_lease(ledger: Ledger, make, node) -> None:
    lease = make.lease(node.id)
    ledger.close_lease(lease.id, "expired", now=201.0)
    upd = make.answer(lease, verdict="rejected", reason="late", at=250.0)
    assert upd.verdict == "rejected" and upd.reason == "late"
    assert (ledger.lease(lease.id).status, ledger.lease(lease.id).closed_at) == ("expired", 201.0)


def test_update_refusals_and_non_finite_metrics(ledger: Ledger, make, node) -> None:
    with pytest.raises(LedgerError, match="verdict"):
        make.answer(make.lease(node.id), verdict="maybe")
    with pytest.raises(LedgerError, match="no lease 999"):
        ledger.record_update(lease_id=999, node_id=node.id, arrays_digest="x", verdict="rejected",
                             tokens=0, steps=0, loss_before=0.0, loss_after=0.0, wall_s=0.0)
    # A rejected update may carry NaN/inf; both backends store them as NULL.
    upd = make.answer(make.lease(node.id), verdict="rejected", reason="non_finite",
                      loss_after=math.nan, norm=math.inf, wall_s=-math.inf)
    stored = ledger.updates()[-1]
    assert stored.id == upd.id
    assert (stored.loss_before, stored.loss_after) == (5.0, None)
    assert (stored.norm, stored.wall_s) == (None, None)


def test_add_credit_and_refusals(ledger: Ledger, inst, make, node) -> None:
    good = make.answer(make.lease(node.id))
    bad = make.answer(make.lease(node.id), verdict="rejected", reason="bad_signature")
    parts = {"kind": "train", "tokens": 1024, "rate_per_1k": 1.0}
    entry = ledger.add_credit(node.id, good.id, 1.024, parts, now=300.0)
    assert (entry.node_id, entry.update_id) == (node.id, good.id)
    assert (entry.amount, entry.created_at) == (1.024, 300.0)
    assert entry.components_dict() == parts
    assert ledger.credits() == [entry] and ledger.credits(node_id=node.id) == [entry]
    assert ledger.credits(node_id=node.id + 1) == []
    with pytest.raises(LedgerError, match="already credited"):
        ledger.add_credit(node.id, good.id, 1.0, parts)
    with pytest.raises(LedgerError, match="rejected"):
        ledger.add_credit(node.id, bad.id, 1.0, parts)
    with pytest.raises(LedgerError, match="no update 999"):
        ledger.add_credit(node.id, 999, 1.0, parts)
    other = make.node(inst.id)
    third = make.answer(make.lease(node.id))
    with pytest.raises(LedgerError, match="belongs to node"):
        ledger.add_credit(other.id, third.id, 1.0, parts)
    for amount in (-1.0, math.nan, math.inf):
        with pytest.raises(LedgerError, match="amount"):
            ledger.add_credit(node.id, third.id, amount, parts)
    with pytest.raises(LedgerError, match="JSON"):
        ledger.add_credit(node.id, third.id, 1.0, {"x": object()})
    assert ledger.credits() == [entry]  # refusals appended nothing


def test_model_versions(ledger: Ledger) -> None:
    assert ledger.latest_version() is None and ledger.versions() == []
    v0 = ledger.add_model_version(0, "d0", "ckpt/d0.safetensors", 0, n_updates=0, tokens=0,
                                  created_at=1.0)
    v1 = ledger.add_model_version(1, "d1", "ckpt/d1.safetensors", 1, n_updates=3,
                                  tokens=5_000_000_000, val_loss=4.5, val_tokens=2048)
    assert [v.version for v in ledger.versions()] == [0, 1]
    assert ledger.latest_version() == v1 and ledger.versions()[1].tokens == 5_000_000_000
    assert v0.val_loss is None and v0.created_at == 1.0
    got = ledger.set_val_loss(0, 5.5, 4096)
    assert (got.val_loss, got.val_tokens) == (5.5, 4096)
    assert (ledger.versions()[0].val_loss, ledger.versions()[0].val_tokens) == (5.5, 4096)
    assert ledger.set_val_loss(1, math.nan, 10).val_loss is None
    with pytest.raises(LedgerError, match="no model version 7"):
        ledger.set_val_loss(7, 1.0, 1)
    with pytest.raises(LedgerError):
        ledger.add_model_version(1, "dup", "p", 1, n_updates=0, tokens=0)


def test_events(ledger: Ledger, node) -> None:
    assert ledger.events() == []
    e1 = ledger.add_event("join", "alice joined", node_id=node.id, at=1.0)
    e2 = ledger.add_event("version", "version 1")
    e3 = ledger.add_event("reject", "bad signature", node_id=node.id, at=3.0)
    assert (e1.kind, e1.node_id, e1.at, e1.message) == ("join", node.id, 1.0, "alice joined")
    assert e2.node_id is None and e2.at > 0
    assert [e.id for e in ledger.events()] == [e1.id, e2.id, e3.id]
    assert [e.id for e in ledger.events(since_id=e1.id)] == [e2.id, e3.id]
    assert [e.id for e in ledger.events(since_id=e1.id, limit=1)] == [e2.id]
    assert ledger.events(since_id=e3.id) == []
    with pytest.raises(LedgerError):
        ledger.add_event("join", "ghost", node_id=999)

"""Per-node summaries against hand-counted numbers, computed in one GROUP BY query."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from coordinator.ledger import Ledger, NodeSummary


def test_summaries_match_hand_counts(ledger: Ledger, make) -> None:
    uni_a = ledger.add_institution("Uni A")
    uni_b = ledger.add_institution("Uni B")
    alice = make.node(uni_a.id, name="alice")
    bob = make.node(uni_b.id, name="bob")
    carol = make.node(uni_a.id, name="carol")

    # alice: train 100 + 200 accepted, eval 50 accepted, train 999 rejected; three credits.
    for tokens, kind, credit in ((100, "train", 0.1), (200, "train", 0.2), (50, "eval", 0.05)):
        upd = make.answer(make.lease(alice.id, kind=kind), tokens=tokens)
        ledger.add_credit(alice.id, upd.id, credit, {"kind": kind, "tokens": tokens})
    make.answer(make.lease(alice.id), verdict="rejected", reason="norm_bound", tokens=999)
    # bob: two rejections, one expired lease with no answer, an open lease.
    make.answer(make.lease(bob.id), verdict="rejected", reason="bad_signature", tokens=7)
    make.answer(make.lease(bob.id, kind="eval"), verdict="rejected", reason="late", tokens=8)
    ledger.close_lease(make.lease(bob.id).id, "expired", now=300.0)
    make.lease(bob.id)
    # carol: nothing but a heartbeat, then revoked.
    ledger.touch_node(carol.id, now=77.0)
    ledger.revoke_node(carol.id)

    got = {s.name: s for s in ledger.node_summaries()}
    assert got["alice"] == NodeSummary(
        node_id=alice.id, name="alice", institution="Uni A", accepted=3, rejected=1,
        tokens=300, eval_tokens=50, credits=pytest.approx(0.35), last_seen=None, revoked=False)
    assert got["bob"] == NodeSummary(
        node_id=bob.id, name="bob", institution="Uni B", accepted=0, rejected=2, tokens=0,
        eval_tokens=0, credits=0.0, last_seen=None, revoked=False)
    assert got["carol"] == NodeSummary(
        node_id=carol.id, name="carol", institution="Uni A", accepted=0, rejected=0, tokens=0,
        eval_tokens=0, credits=0.0, last_seen=77.0, revoked=True)
    assert [s.node_id for s in ledger.node_summaries()] == [alice.id, bob.id, carol.id]
    for s in got.values():
        assert type(s.accepted) is int and type(s.tokens) is int and type(s.credits) is float


def test_summaries_are_one_aggregate_query(ledger: Ledger, inst, make) -> None:
    nodes = [make.node(inst.id) for _ in range(3)]
    for node in nodes:
        for _ in range(2):
            upd = make.answer(make.lease(node.id), tokens=10)
            ledger.add_credit(node.id, upd.id, 1.0, {})
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(ledger._engine, "before_cursor_execute", record)
    try:
        summaries = ledger.node_summaries()
    finally:
        event.remove(ledger._engine, "before_cursor_execute", record)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1 and "GROUP BY" in selects[0].upper()
    # two updates and two credits per node: joining both must not multiply either sum
    assert [(s.accepted, s.tokens, s.credits) for s in summaries] == [(2, 20, 2.0)] * 3


def test_summaries_empty(ledger: Ledger) -> None:
    assert ledger.node_summaries() == []

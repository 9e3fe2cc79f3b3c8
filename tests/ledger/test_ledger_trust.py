"""Verification records in the ledger: the measured improvement, replay lookups, node trust,
and the upgrade of ledgers made before the improvement column existed."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from coordinator.ledger import Ledger
from coordinator.verify.trust import trust_score


def test_improvement_is_stored_and_non_finite_becomes_null(ledger: Ledger, inst, make) -> None:
    node = make.node(inst.id)
    scored = make.answer(make.lease(node.id), improvement=0.25)
    broken = make.answer(make.lease(node.id), verdict="rejected", improvement=float("nan"))
    plain = make.answer(make.lease(node.id, kind="eval"))
    got = {u.id: u.improvement for u in ledger.updates()}
    assert got == {scored.id: pytest.approx(0.25), broken.id: None, plain.id: None}


def test_accepted_with_digests_finds_the_first_accepted_update_of_each(
        ledger: Ledger, inst, make) -> None:
    node = make.node(inst.id)
    make.answer(make.lease(node.id), verdict="rejected")  # digest "abab..." but rejected
    assert ledger.accepted_with_digests(["ab" * 32]) == {}
    first = make.answer(make.lease(node.id))
    make.answer(make.lease(node.id))
    other = ledger.record_update(
        lease_id=make.lease(node.id).id, node_id=node.id, arrays_digest="ef" * 32,
        verdict="accepted", tokens=1, reason=None, detail="", received_at=1.0, steps=1,
        loss_before=1.0, loss_after=1.0, wall_s=1.0)
    got = ledger.accepted_with_digests(["ab" * 32, "cd" * 32, "ef" * 32, "ab" * 32])
    assert {d: row.id for d, row in got.items()} == {"ab" * 32: first.id, "ef" * 32: other.id}
    # more digests than one statement takes: asked in chunks
    many = [f"{i:064x}" for i in range(1_200)] + ["ef" * 32]
    assert {d: row.id for d, row in ledger.accepted_with_digests(many).items()} == {
        "ef" * 32: other.id}


def test_trust_counts_train_updates_with_mismatches_weighted(ledger: Ledger, inst, make) -> None:
    good, cheat, fresh = make.node(inst.id), make.node(inst.id), make.node(inst.id)
    for _ in range(3):
        make.answer(make.lease(good.id))
    make.answer(make.lease(good.id), verdict="rejected", reason="late")
    make.answer(make.lease(cheat.id))
    make.answer(make.lease(cheat.id), verdict="rejected", reason="spot_check_mismatch")
    for _ in range(5):  # eval answers build no trust
        make.answer(make.lease(cheat.id, kind="eval"))
    got = {s.node_id: s.trust for s in ledger.node_summaries()}
    assert got[good.id] == pytest.approx(trust_score(3, 1)) == pytest.approx(4 / 6)
    assert got[cheat.id] == pytest.approx(trust_score(1, 1, 1)) == pytest.approx(2 / 8)
    assert got[fresh.id] == 0.5
    [one] = ledger.node_summaries(cheat.id)
    assert one.trust == got[cheat.id]


def test_an_older_ledger_gains_the_improvement_column(open_ledger) -> None:
    old = open_ledger()
    with old._engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE updates DROP COLUMN improvement")
    assert "improvement" not in {c["name"] for c in inspect(old._engine).get_columns("updates")}
    old.close()
    led = open_ledger()
    assert "improvement" in {c["name"] for c in inspect(led._engine).get_columns("updates")}
    inst = led.add_institution("Uni A")
    node = led.add_node(1, "n", inst.id, b"pem", "f" * 16)
    lease = led.record_lease(run_id="r", round=1, shard_id=1, kind="train", node_id=node.id,
                             base_version=0, nonce="a" * 32, data_start=0, data_end=10,
                             deadline=1.0)
    led.record_update(lease_id=lease.id, node_id=node.id, arrays_digest="x", verdict="accepted",
                      tokens=1, steps=1, loss_before=1.0, loss_after=0.5, wall_s=1.0,
                      improvement=0.5)
    assert [u.improvement for u in led.updates()] == [0.5]
    open_ledger()  # opening an up-to-date ledger again changes nothing


def test_lost_spot_check_within_the_last_train_updates(ledger: Ledger, inst, make) -> None:
    recent, served, clean, fresh = (make.node(inst.id) for _ in range(4))
    for _ in range(3):
        make.answer(make.lease(recent.id))
    make.answer(make.lease(recent.id), verdict="rejected", reason="spot_check_mismatch")
    make.answer(make.lease(recent.id))
    make.answer(make.lease(served.id), verdict="rejected", reason="spot_check_mismatch")
    for _ in range(5):  # five accepted train updates since: probation served
        make.answer(make.lease(served.id))
    make.answer(make.lease(clean.id), verdict="rejected", reason="late")
    for _ in range(6):  # eval answers do not count towards the window
        make.answer(make.lease(recent.id, kind="eval"))
    dodger = make.node(inst.id)
    make.answer(make.lease(dodger.id), verdict="rejected", reason="spot_check_mismatch")
    for _ in range(6):  # cheap rejections do not serve probation either
        make.answer(make.lease(dodger.id), verdict="rejected", reason="base_mismatch")
    assert ledger.lost_spot_check_within(5) == {recent.id, dodger.id}
    assert ledger.lost_spot_check_within(6) == {recent.id, served.id, dodger.id}
    assert ledger.lost_spot_check_within(1) == {dodger.id}


def test_recent_train_work_is_each_nodes_newest_accepted_train_updates(
        ledger: Ledger, inst, make) -> None:
    fast, slow, idle = make.node(inst.id), make.node(inst.id), make.node(inst.id)
    for i in range(5):  # (tokens, wall_s) = (1000 + i, 1 + i), oldest first
        make.answer(make.lease(fast.id), tokens=1000 + i, wall_s=1.0 + i)
    make.answer(make.lease(fast.id), verdict="rejected", tokens=9, wall_s=9.0)
    make.answer(make.lease(fast.id, kind="eval"), tokens=8, wall_s=8.0)
    make.answer(make.lease(slow.id), tokens=10, wall_s=None)
    got = ledger.recent_train_work([slow.id, fast.id, idle.id, fast.id], 3)
    assert got == {fast.id: [(1004, 5.0), (1003, 4.0), (1002, 3.0)],
                   slow.id: [(10, None)], idle.id: []}
    # more nodes than one statement takes: asked in chunks, the same answer
    many = ledger.recent_train_work([*range(10_000, 11_200), fast.id], 1)
    assert many[fast.id] == [(1004, 5.0)] and len(many) == 1_201

"""Institutions, invites and nodes: get-or-create, single-use invites, uint64 Flower ids."""

from __future__ import annotations

import threading

import pytest

from coordinator.ledger import Ledger
from protocol.errors import EnrollmentError, LedgerError

UINT64_MAX = 18446744073709551615


def test_add_institution_is_get_or_create(ledger: Ledger) -> None:
    a = ledger.add_institution("Uni A", now=1.0)
    again = ledger.add_institution("  Uni A ", now=2.0)
    b = ledger.add_institution("Uni B", now=3.0)
    assert again.id == a.id and again.created_at == 1.0
    assert [(i.id, i.name) for i in ledger.institutions()] == [(a.id, "Uni A"), (b.id, "Uni B")]
    with pytest.raises(LedgerError, match="empty"):
        ledger.add_institution("   ")


def test_invite_redeems_once(ledger: Ledger, inst) -> None:
    invite = ledger.create_invite(inst, "hash-1", expires_at=1000.0, now=5.0)
    assert (invite.used_at, invite.used_by_node_id, invite.revoked) == (None, None, False)
    got = ledger.redeem_invite("hash-1", now=10.0)
    assert got.id == invite.id and got.used_at == 10.0 and got.institution_id == inst.id
    with pytest.raises(EnrollmentError, match="^invite token was already used$"):
        ledger.redeem_invite("hash-1", now=11.0)
    assert ledger.invites()[0].used_at == 10.0  # the failed attempt changed nothing


def test_invite_takes_institution_or_its_id(ledger: Ledger, inst) -> None:
    ledger.create_invite(inst.id, "by-id", expires_at=1000.0)
    other = ledger.add_institution("Uni B")
    ledger.create_invite(other, "by-row", expires_at=1000.0)
    assert [i.secret_hash for i in ledger.invites(institution_id=other.id)] == ["by-row"]
    assert len(ledger.invites()) == 2
    with pytest.raises(LedgerError):
        ledger.create_invite(inst, "by-id", expires_at=1000.0)  # secret hashes are unique


def test_unknown_expired_and_revoked_invites(ledger: Ledger, inst) -> None:
    with pytest.raises(EnrollmentError, match="^invite token is not valid$"):
        ledger.redeem_invite("nope", now=1.0)
    ledger.create_invite(inst, "old", expires_at=100.0)
    with pytest.raises(EnrollmentError, match="^invite token has expired$"):
        ledger.redeem_invite("old", now=100.0)  # expiry is exclusive
    revoked = ledger.create_invite(inst, "gone", expires_at=1000.0)
    assert ledger.revoke_invite(revoked.id).revoked
    with pytest.raises(EnrollmentError, match="^invite token was revoked$"):
        ledger.redeem_invite("gone", now=1.0)
    assert all(i.used_at is None for i in ledger.invites())
    with pytest.raises(LedgerError, match="no invite 999"):
        ledger.revoke_invite(999)


def test_concurrent_redeems_have_exactly_one_winner(open_ledger, inst) -> None:
    ledger = open_ledger()
    second = open_ledger()  # a second coordinator process racing for the same database
    ledger.create_invite(inst, "race", expires_at=1e12)
    n = 8
    barrier = threading.Barrier(n)
    wins: list[int] = []
    errors: list[BaseException] = []

    def redeem(i: int) -> None:
        led = ledger if i % 2 else second
        barrier.wait()
        try:
            led.redeem_invite("race", now=50.0 + i)
            wins.append(i)
        except BaseException as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    threads = [threading.Thread(target=redeem, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(wins) == 1, errors
    assert len(errors) == n - 1
    assert all(isinstance(e, EnrollmentError) and str(e) == "invite token was already used"
               for e in errors), errors
    assert ledger.invites()[0].used_at == 50.0 + wins[0]


def test_mark_invite_used(ledger: Ledger, inst, make) -> None:
    invite = ledger.create_invite(inst, "h", expires_at=1e12)
    node = make.node(inst.id)
    with pytest.raises(LedgerError, match="never redeemed"):
        ledger.mark_invite_used(invite.id, node.id)
    ledger.redeem_invite("h", now=1.0)
    assert ledger.mark_invite_used(invite.id, node.id).used_by_node_id == node.id
    assert ledger.mark_invite_used(invite.id, node.id).used_by_node_id == node.id  # idempotent
    other = make.node(inst.id)
    with pytest.raises(LedgerError, match="already enrolled"):
        ledger.mark_invite_used(invite.id, other.id)
    with pytest.raises(LedgerError, match="no node 999"):
        ledger.mark_invite_used(invite.id, 999)


def test_release_invite_after_failed_enrollment(ledger: Ledger, inst, make) -> None:
    invite = ledger.create_invite(inst, "h", expires_at=1e12)
    ledger.redeem_invite("h", now=1.0)
    assert ledger.release_invite(invite.id).used_at is None
    assert ledger.redeem_invite("h", now=2.0).used_at == 2.0  # usable again
    ledger.mark_invite_used(invite.id, make.node(inst.id).id)
    with pytest.raises(LedgerError, match="already enrolled"):
        ledger.release_invite(invite.id)
    with pytest.raises(LedgerError, match="no invite 999"):
        ledger.release_invite(999)


def test_add_node_and_lookups(ledger: Ledger, inst) -> None:
    pem = b"-----BEGIN PUBLIC KEY-----\nMHYw\n-----END PUBLIC KEY-----\n"
    node = ledger.add_node("42", "alice-gpu", inst.id, pem, "00ff00ff00ff00ff", now=7.0)
    assert node.id is not None and node.flower_node_id == "42"
    assert node.public_key_pem == pem.decode() and node.enrolled_at == 7.0
    assert (node.last_seen, node.revoked) == (None, False)
    assert ledger.node(node.id) == node
    assert ledger.node(999) is None
    assert ledger.node_by_flower_id(42) == node == ledger.node_by_flower_id("42")
    assert ledger.node_by_flower_id(43) is None
    assert ledger.node_by_fingerprint("00ff00ff00ff00ff") == node
    assert ledger.node_by_fingerprint("missing") is None
    assert ledger.nodes() == [node]


def test_uint64_flower_ids_round_trip(ledger: Ledger, inst, make) -> None:
    big = make.node(inst.id, flower_id=UINT64_MAX)
    zero = make.node(inst.id, flower_id=0)
    assert ledger.node_by_flower_id(UINT64_MAX).id == big.id
    assert ledger.node_by_flower_id(str(UINT64_MAX)).flower_node_id == str(UINT64_MAX)
    assert int(ledger.node(zero.id).flower_node_id) == 0
    for bad in (UINT64_MAX + 1, -1, "12ab"):
        with pytest.raises(LedgerError, match="flower node id"):
            make.node(inst.id, flower_id=bad)
    with pytest.raises(LedgerError):
        make.node(inst.id, flower_id=UINT64_MAX)  # unique


def test_node_ids_autoincrement_and_fk(ledger: Ledger, inst, make) -> None:
    ids = [make.node(inst.id).id for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    with pytest.raises(LedgerError):
        make.node(999)  # no such institution: foreign keys are enforced


def test_touch_and_revoke_node(ledger: Ledger, inst, make) -> None:
    node = make.node(inst.id)
    ledger.touch_node(node.id, now=123.5)
    assert ledger.node(node.id).last_seen == 123.5
    assert ledger.revoke_node(node.id).revoked
    assert ledger.node(node.id).revoked
    with pytest.raises(LedgerError, match="no node 999"):
        ledger.touch_node(999, now=1.0)
    with pytest.raises(LedgerError, match="no node 999"):
        ledger.revoke_node(999)


def test_node_by_fingerprint_prefers_live_node(ledger: Ledger, inst, make) -> None:
    old = make.node(inst.id, fingerprint="same")
    ledger.revoke_node(old.id)
    new = make.node(inst.id, fingerprint="same")
    assert ledger.node_by_fingerprint("same").id == new.id
    ledger.revoke_node(new.id)
    assert ledger.node_by_fingerprint("same").id == new.id


def test_rows_stay_usable_after_close(open_ledger, ledger_url) -> None:
    ledger = open_ledger()
    inst = ledger.add_institution("Uni A")
    ledger.add_node(5, "n", inst.id, "pem", "fp")
    nodes = ledger.nodes()
    ledger.close()
    assert nodes[0].name == "n" and nodes[0].institution_id == inst.id  # detached, fully loaded

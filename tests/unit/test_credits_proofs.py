"""``atom-node credits --proof`` against the real coordinator service: every receipt of a node
is proven in the tree of all receipts, only the node's own key gets its proofs, and a bad head,
receipt or proof from the coordinator is one line and a non-zero exit. The coordinator side is
``credits_world``; a misbehaving coordinator is the real one with its answer altered."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from credits_world import World, credits, make_world, ok_json, one_line_failure

from coordinator.accounting.receipt_tree import receipt_tree
from coordinator.accounting.statements import StatementDesk
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.merkle import ReceiptProof, SignedTreeHead, sign_tree_head
from protocol.receipts import Receipt, statement_request_bytes
from protocol.signing import generate_key, load_private_key, sign


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with make_world(tmp_path) as w:
        yield w


def _serve_altered(monkeypatch: pytest.MonkeyPatch, alter) -> None:  # type: ignore[no-untyped-def]
    """Make the running coordinator answer ``alter(head, proofs)`` instead."""
    real = StatementDesk.receipt_proofs

    def altered(self, *args):  # type: ignore[no-untyped-def]
        return alter(*real(self, *args))

    monkeypatch.setattr(StatementDesk, "receipt_proofs", altered)


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


# -- every receipt proven ------------------------------------------------------------------

def test_every_receipt_is_proven_in_the_tree_of_all(world: World) -> None:
    tree = receipt_tree(world.ledger)
    assert tree.size == 5  # a: 3 paid, b: 2 paid (the late and the forged earned nothing)
    for name, n in (("a", 3), ("b", 2), ("c", 0)):
        doc = ok_json("--home", world.homes[name].path, "--proof")
        assert (doc["node_id"], doc["run_id"]) == (world.ids[name], "credits-test")
        assert (doc["tree_size"], doc["root"]) == (5, tree.root_hex)
        assert doc["coordinator_key_fingerprint"] == world.issuer.fingerprint
        mine = [r.update_id for r in world.ledger.receipts(node_id=world.ids[name])]
        assert doc["receipts_proven"] == n and [r["update_id"] for r in doc["receipts"]] == mine
        assert all(r["ok"] for r in doc["receipts"])
        assert [r["leaf_index"] for r in doc["receipts"]] == [
            i for i, r in enumerate(world.ledger.receipts()) if r.node_id == world.ids[name]]
    # the root a model card would print is accepted, in either case
    doc = ok_json("--home", world.homes["a"].path, "--root", tree.root_hex.upper())
    assert doc["receipts_proven"] == 3


def test_table_output(world: World) -> None:
    result = credits("--home", world.homes["a"].path, "--proof")
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "receipts of node 1 in the receipt tree" in out
    assert "3 receipts proven in the tree of 5 receipts (run credits-test)" in out
    assert f"tree root {receipt_tree(world.ledger).root_hex}\n" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and all(row.split("│")[-2].strip() == "ok" for row in rows)


# -- who may ask --------------------------------------------------------------------------

def test_only_the_nodes_own_key_gets_its_proofs(world: World) -> None:
    ts = time.time()
    node_a = world.ids["a"]
    key_b = load_private_key(world.homes["b"].key_path)
    req = pb.StatementRequest(node_id=node_a, timestamp=ts,
                              signature=sign(key_b, statement_request_bytes(node_a, ts)))
    creds = grpc.ssl_channel_credentials(root_certificates=world.rd.tls.ca_cert.read_bytes())
    with grpc.secure_channel(world.address, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).GetReceiptProofs(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bad_signature" in info.value.details()


# -- a coordinator that proves something else -----------------------------------------------

def test_a_tampered_audit_path_fails(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def alter(head, proofs):  # type: ignore[no-untyped-def]
        p = proofs[1]
        bad = dataclasses.replace(p, audit_path=(_flip(p.audit_path[0]), *p.audit_path[1:]))
        return head, [proofs[0], bad, *proofs[2:]]

    _serve_altered(monkeypatch, alter)
    update_id = world.ledger.receipts(node_id=world.ids["a"])[1].update_id
    code, line = one_line_failure("--home", world.homes["a"].path, "--proof")
    root = receipt_tree(world.ledger).root_hex
    assert code == 4 and line == (f"error: receipt for update {update_id} is not in the "
                                  f"receipt tree of root {root}: bad_inclusion_proof")


@pytest.mark.parametrize("change", ["index", "size"])
def test_a_wrong_index_or_size_fails(world: World, monkeypatch: pytest.MonkeyPatch,
                                     change: str) -> None:
    def alter(signed, proofs):  # type: ignore[no-untyped-def]
        if change == "index":
            return signed, [dataclasses.replace(p, leaf_index=p.leaf_index + 1) for p in proofs]
        # signed, but not that tree's size (5 -> 3: node a's leaves 0-2 get shorter paths;
        # 5 -> 8 would not show, their paths have the same shape there: the signature binds
        # the size to the root)
        head = dataclasses.replace(signed.head, tree_size=signed.head.tree_size - 2)
        return sign_tree_head(head, world.issuer.key), proofs

    _serve_altered(monkeypatch, alter)
    code, line = one_line_failure("--home", world.homes["a"].path, "--proof")
    assert code == 4 and line.endswith(": bad_inclusion_proof")


def test_a_signed_receipt_that_is_not_in_the_tree_fails(world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def alter(head, proofs):  # type: ignore[no-untyped-def]
        p = proofs[0]
        extra = world.issuer.issue(Receipt.from_dict(
            {**p.signed.receipt.to_dict(), "update_id": 999, "amount": 5.0}))
        # at a leaf of the tree no other proof claims (node b's last receipt)
        return head, [*proofs, ReceiptProof(extra, head.head.tree_size - 1, p.audit_path)]

    _serve_altered(monkeypatch, alter)
    code, line = one_line_failure("--home", world.homes["a"].path, "--proof")
    assert code == 4 and line.startswith("error: receipt for update 999 is not in the receipt "
                                         "tree of root ")


def test_a_tampered_receipt_fails_on_its_signature(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def alter(head, proofs):  # type: ignore[no-untyped-def]
        p = proofs[0]
        receipt = dataclasses.replace(p.signed.receipt, amount=p.signed.receipt.amount + 1)
        bad = dataclasses.replace(p, signed=dataclasses.replace(p.signed, receipt=receipt))
        return head, [bad, *proofs[1:]]

    _serve_altered(monkeypatch, alter)
    code, line = one_line_failure("--home", world.homes["a"].path, "--proof")
    update_id = world.ledger.receipts(node_id=world.ids["a"])[0].update_id
    assert code == 4 and line == (f"error: receipt for update {update_id} does not verify: "
                                  "bad_signature")


def test_a_head_not_signed_by_the_pinned_key_fails(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mallory = generate_key()
    _serve_altered(monkeypatch, lambda signed, proofs: (
        sign_tree_head(signed.head, mallory), proofs))
    code, line = one_line_failure("--home", world.homes["a"].path, "--proof")
    assert code == 4 and line.startswith("error: bad_tree_head: the receipt tree head does not "
                                         "verify with coordinator key ")


def test_a_malformed_head_is_one_line(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_altered(monkeypatch, lambda signed, proofs: (SignedTreeHead(
        dataclasses.replace(signed.head, root=""), signed.signature), proofs))
    code, line = one_line_failure("--home", world.homes["a"].path, "--proof")
    assert code == 3 and line == "error: tree head.root: expected 64 lowercase hex"


# -- another root, and user mistakes -------------------------------------------------------

def test_a_root_from_an_older_tree_says_so(world: World) -> None:
    old = receipt_tree(world.ledger).root_hex
    world.work("c", "train")  # a receipt issued since the model card printed ``old``
    code, line = one_line_failure("--home", world.homes["a"].path, "--root", old)
    new = receipt_tree(world.ledger).root_hex
    assert code == 4 and line == (f"error: other_root: the coordinator proves against root "
                                  f"{new} (6 receipts), not {old}: a different tree, e.g. "
                                  "receipts issued since that root")


def test_mistakes_are_one_line(world: World, tmp_path: Path) -> None:
    home = world.homes["a"].path
    code, line = one_line_failure("--home", home, "--root", "abc")
    assert code == 2 and line == "error: --root: expected the tree root as 64 hex digits, not 'abc'"
    code, line = one_line_failure("--home", home, "--proof", "--verify-only", tmp_path / "x")
    assert code == 2 and "cannot be combined with --verify-only or --save" in line
    code, line = one_line_failure("--home", tmp_path / "empty", "--proof")
    assert code == 2 and "no coordinator key pinned" in line

"""The receipt tree's hashing (RFC 6962 / RFC 9162) and its signed head.

Known answers are Certificate Transparency's reference vectors, as in
certificate-transparency-go (merkletree/merkle_tree_test.go) and google/trillian
(merkle/logverifier/log_verifier_test.go, whose leaf numbers count from 1): the 8 leaves
below, the root of each prefix, and audit paths. Larger trees are checked against a plain
recursive transcription of the RFC's definitions, written here independently of the module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from protocol.errors import ProtocolError
from protocol.merkle import (
    EMPTY_ROOT, MerkleTree, ReceiptProof, SignedTreeHead, TreeHead, inclusion_proof, leaf_hash,
    merkle_root, node_hash, sign_tree_head, tree_head_bytes, verify_inclusion,
)
from protocol.receipts import Receipt, receipt_bytes, sign_receipt
from protocol.signing import fingerprint, generate_key, public_key_pem, sign

CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [  # root of the first n leaves, n = 1..8
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATHS = [  # (leaf index from 0, tree size, audit path)
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


# -- an independent reference: RFC 6962 section 2.1, transcribed recursively ----------------

def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + _mth(d[:k]) + _mth(d[k:])).digest()


def _path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return _path(m, d[:k]) + [_mth(d[k:])]
    return _path(m - k, d[k:]) + [_mth(d[:k])]


def _sides(m: int, n: int) -> list[str]:
    """Which side each sibling of leaf ``m`` is on, leaf level first: a path's shape."""
    if n == 1:
        return []
    k = _k(n)
    return _sides(m, k) + ["R"] if m < k else _sides(m - k, n - k) + ["L"]


def _leaves(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() * (i % 3) for i in range(n)]


# -- known answers ----------------------------------------------------------------------------

def test_roots_match_the_ct_reference() -> None:
    assert EMPTY_ROOT.hex() == ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert merkle_root([]) == EMPTY_ROOT
    for n, want in enumerate(CT_ROOTS, start=1):
        assert merkle_root(CT_LEAVES[:n]).hex() == want, n


@pytest.mark.parametrize("index,size,path", CT_PATHS)
def test_audit_paths_match_the_ct_reference(index: int, size: int, path: list[str]) -> None:
    proof = inclusion_proof(CT_LEAVES[:size], index)
    assert [p.hex() for p in proof] == path
    root = bytes.fromhex(CT_ROOTS[size - 1])
    assert verify_inclusion(leaf_hash(CT_LEAVES[index]), index, size, proof, root)


def test_hashes_are_domain_separated() -> None:
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    want = hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert node_hash(b"a" * 32, b"b" * 32) == want


# -- every shape of tree ------------------------------------------------------------------------

def test_every_leaf_of_every_tree_up_to_70_proves_and_matches_the_reference() -> None:
    data = _leaves(70)
    for n in range(1, 71):
        tree = MerkleTree.of_leaves(data[:n])
        assert tree.size == n and tree.root == _mth(data[:n]), n
        for i in range(n):
            proof = tree.inclusion_proof(i)
            assert proof == _path(i, data[:n]), (n, i)
            assert verify_inclusion(leaf_hash(data[i]), i, n, proof, tree.root), (n, i)


def test_what_does_not_prove() -> None:
    data = _leaves(70)
    for n in (1, 2, 3, 7, 8, 9, 33, 64, 70):
        tree = MerkleTree.of_leaves(data[:n])
        other = MerkleTree.of_leaves(data[:n - 1] + [b"other"]).root
        for i in {0, n // 2, n - 1}:
            leaf, proof = leaf_hash(data[i]), tree.inclusion_proof(i)
            assert verify_inclusion(leaf, i, n, proof, tree.root)
            assert not verify_inclusion(leaf_hash(data[i] + b"!"), i, n, proof, tree.root)
            assert not verify_inclusion(leaf_hash(b"not in the tree"), i, n, proof, tree.root)
            assert not verify_inclusion(leaf, i, n, proof, other)  # another root
            for wrong in {i - 1, i + 1, i ^ 1, n} - {i}:  # another index
                assert not verify_inclusion(leaf, wrong, n, proof, tree.root), (n, i, wrong)
            for size in range(1, 2 * n + 2):  # another size: only a path's shape binds it
                # (the signed head binds size to root; e.g. leaf 0 has the same path in trees
                # of 3 and 4 leaves, so RFC 9162 cannot tell those sizes apart from the path)
                same_shape = i < size and _sides(i, size) == _sides(i, n)
                assert verify_inclusion(leaf, i, size, proof, tree.root) == same_shape, (
                    n, i, size)
            if proof:
                flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
                assert not verify_inclusion(leaf, i, n, flipped, tree.root)
                assert not verify_inclusion(leaf, i, n, proof[:-1], tree.root)  # too short
            assert not verify_inclusion(leaf, i, n, [*proof, b"\0" * 32], tree.root)  # too long


@pytest.mark.parametrize("args", [
    (b"short", 0, 1, [], b"r" * 32), (b"l" * 32, -1, 1, [], b"r" * 32),
    (b"l" * 32, 0, 0, [], EMPTY_ROOT), (b"l" * 32, 0, 2, [b"p"], b"r" * 32),
    (b"l" * 32, True, 2, [b"p" * 32], b"r" * 32), (None, 0, 1, [], b"r" * 32),
    (b"l" * 32, 0, 2, [None], b"r" * 32), (b"l" * 32, "0", 1, [], b"l" * 32),
])
def test_malformed_input_is_false_never_an_exception(args: tuple) -> None:
    assert verify_inclusion(*args) is False


def test_out_of_range_index_is_a_protocol_error() -> None:
    tree = MerkleTree.of_leaves(_leaves(3))
    for bad in (-1, 3, True):
        with pytest.raises(ProtocolError, match="outside a tree of 3 leaves"):
            tree.inclusion_proof(bad)
    with pytest.raises(ProtocolError, match="outside a tree of 0"):
        MerkleTree([]).inclusion_proof(0)
    with pytest.raises(ProtocolError, match="32 bytes each"):
        MerkleTree([b"x" * 31])


# -- the signed tree head --------------------------------------------------------------------

HEAD = TreeHead(run_id="run-ü", tree_size=8, root=CT_ROOTS[7], issued_at=1_700_000_000.25)


def test_tree_head_bytes_are_exactly_documented() -> None:
    assert tree_head_bytes(HEAD) == (
        b'atom-receipt-tree-v1\n{"issued_at":1700000000.25,"root":"' + CT_ROOTS[7].encode()
        + b'","run_id":"run-\\u00fc","tree_size":8}')
    assert tree_head_bytes(dataclasses.replace(HEAD, issued_at=17)).count(b'"issued_at":17.0,')


def test_tree_head_round_trips_and_is_checked() -> None:
    assert TreeHead.from_dict(json.loads(json.dumps(HEAD.to_dict()))) == HEAD
    for bad, match in [({**HEAD.to_dict(), "root": "AB" * 32}, "root"),
                       ({**HEAD.to_dict(), "tree_size": -1}, "tree_size"),
                       ({**HEAD.to_dict(), "tree_size": True}, "tree_size"),
                       ({**HEAD.to_dict(), "issued_at": float("nan")}, "issued_at"),
                       ({**HEAD.to_dict(), "run_id": 5}, "run_id"),
                       ({**HEAD.to_dict(), "extra": 1}, "extra"), ([], "object")]:
        with pytest.raises(ProtocolError, match=match):
            TreeHead.from_dict(bad)


def test_tree_head_signature() -> None:
    coordinator, mallory = generate_key(), generate_key()
    pem = public_key_pem(coordinator)
    signed = sign_tree_head(HEAD, coordinator)
    assert signed.verifies(pem)
    # tampered: every field is signed
    for change in ({"root": CT_ROOTS[6]}, {"tree_size": 9}, {"run_id": "run-2"},
                   {"issued_at": HEAD.issued_at + 1}):
        assert not SignedTreeHead(dataclasses.replace(HEAD, **change), signed.signature
                                  ).verifies(pem), change
    assert not sign_tree_head(HEAD, mallory).verifies(pem)  # wrong key
    # replay: a signature the coordinator made for something else is not a tree head's
    receipt = Receipt(run_id="r", node_id=1, update_id=1, update_digest="a" * 64,
                      lease_nonce="b" * 32, round=1, shard_id=1, kind="train", tokens=1,
                      amount=1.0, components={}, issued_at=1.0,
                      coordinator_key_fingerprint=fingerprint(pem))
    other = sign(coordinator, tree_head_bytes(HEAD)[len(b"atom-receipt-tree-v1\n"):])
    assert not SignedTreeHead(HEAD, other).verifies(pem)
    assert not SignedTreeHead(HEAD, sign_receipt(receipt, coordinator).signature).verifies(pem)
    assert not SignedTreeHead(HEAD, b"not der").verifies(pem)
    assert not SignedTreeHead(dataclasses.replace(HEAD, root="x"), signed.signature).verifies(pem)


# -- a receipt in the tree ----------------------------------------------------------------

def test_receipt_proof_against_a_head() -> None:
    key = generate_key()
    fp = fingerprint(public_key_pem(key))
    signed = [sign_receipt(Receipt(
        run_id="r", node_id=1 + i % 2, update_id=10 + i, update_digest="a" * 64,
        lease_nonce=f"{i:032x}", round=1, shard_id=i, kind="train", tokens=64,
        amount=0.064, components={"kind": "train"}, issued_at=1.0 + i,
        coordinator_key_fingerprint=fp), key) for i in range(5)]
    tree = MerkleTree.of_leaves(receipt_bytes(s.receipt) for s in signed)
    head = TreeHead("r", tree.size, tree.root.hex(), 2.0)
    proofs = [ReceiptProof(s, i, tuple(tree.inclusion_proof(i))) for i, s in enumerate(signed)]
    assert all(p.included_in(head) for p in proofs)
    first = proofs[0]
    tampered = dataclasses.replace(first.signed, receipt=dataclasses.replace(
        first.signed.receipt, amount=1.0))
    assert not dataclasses.replace(first, signed=tampered).included_in(head)
    assert not dataclasses.replace(first, leaf_index=1).included_in(head)
    assert not first.included_in(dataclasses.replace(head, tree_size=4))
    assert not proofs[4].included_in(dataclasses.replace(head, tree_size=6))
    assert not first.included_in(dataclasses.replace(head, root=CT_ROOTS[0]))
    assert not first.included_in(dataclasses.replace(head, root="not hex"))

r"""A Merkle tree over every credit receipt, so one published root commits to all of them.

A statement (``protocol.receipts``) proves what one node was paid; it says nothing about what
everyone else was paid. A single root over all receipts does: the coordinator publishes it
(in a model card, say), and each node checks that its own receipts are inside it with a short
audit path, without seeing anyone else's.

The hashing is Certificate Transparency's (RFC 6962 section 2.1, RFC 9162 section 2.1), so
any CT library checks our proofs::

    leaf hash      MTH({d}) = SHA-256(0x00 || d)
    interior node  SHA-256(0x01 || left || right)
    n > 1 leaves   split at k, the largest power of two smaller than n: MTH(D[0:k]), MTH(D[k:n])
    empty tree     SHA-256(b"")

The receipt tree's leaves are exactly the signed bytes of each receipt
(``protocol.receipts.receipt_bytes``: ``b"atom-receipt-v1\n"`` + canonical JSON), in
ascending receipt id of the coordinator's ledger, which is the order the receipts were issued.
A leaf's index is its position in that order, from 0.

The coordinator signs a tree head with its key (ECDSA over SHA-256, DER, as receipts)::

    tree_head_bytes(head) = b"atom-receipt-tree-v1\n" + canonical JSON
        {"issued_at": float, "root": 64 lowercase hex, "run_id": str, "tree_size": int}

with the canonical JSON of ``protocol.receipts`` (sorted keys, no whitespace, ``issued_at``
as Python's ``repr(float)``).

Verification returns ``bool`` and never raises, whatever it is handed (Flower's
``verify(...) -> bool``): callers turn ``False`` into their own typed error with a reason.
A path binds the tree size only through its shape (leaf 0 has the same path in trees of 3
and 4 leaves); the signed head is what binds a size to its root.
Receipts issued concurrently on PostgreSQL may take ids out of commit order, so a later tree
need not extend an earlier one; every proof is checked against the head it came with.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol._fields import HEX64, canonical_json, check_keys
from protocol.errors import ProtocolError
from protocol.receipts import SignedReceipt, receipt_bytes
from protocol.signing import sign, verify

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "TREE_HEAD_PREFIX",
    "MerkleTree",
    "ReceiptProof",
    "SignedTreeHead",
    "TreeHead",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "sign_tree_head",
    "tree_head_bytes",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
TREE_HEAD_PREFIX = b"atom-receipt-tree-v1\n"


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: the 0x00 prefix keeps a leaf from passing for an interior node."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleTree:
    """An RFC 6962 tree kept level by level, to hand out many audit paths from one build.

    Building hashes each node once (2n - 1 hashes: about 1 s and 64 MB for a million
    leaves, half of it the leaf hashes): levels are built bottom-up by pairing nodes, and a
    level's last node without a partner moves up unchanged. That is the same tree as the
    RFC's split at the largest power of two (its left subtrees are always perfect, so only
    the right edge can be ragged).
    """

    def __init__(self, leaf_hashes: Iterable[bytes]) -> None:
        level = b"".join(leaf_hashes)
        if len(level) % HASH_SIZE:
            raise ProtocolError(f"leaf hashes must be {HASH_SIZE} bytes each")
        self.size = len(level) // HASH_SIZE
        self._levels = [level]  # each level: its node hashes concatenated
        while len(level) > HASH_SIZE:
            n = len(level) // HASH_SIZE
            out = bytearray()
            for at in range(0, (n - 1) * HASH_SIZE, 2 * HASH_SIZE):
                out += hashlib.sha256(b"\x01" + level[at:at + 2 * HASH_SIZE]).digest()
            if n % 2:
                out += level[-HASH_SIZE:]
            level = bytes(out)
            self._levels.append(level)

    @classmethod
    def of_leaves(cls, leaves: Iterable[bytes]) -> MerkleTree:
        return cls(leaf_hash(d) for d in leaves)

    @property
    def root(self) -> bytes:
        return self._levels[-1] if self.size else EMPTY_ROOT

    def inclusion_proof(self, index: int) -> list[bytes]:
        """The audit path of leaf ``index`` (RFC 6962 PATH), the leaf's sibling first."""
        self._check(index)
        path = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling * HASH_SIZE < len(level):  # else: the last node, moved up unpaired
                path.append(level[sibling * HASH_SIZE:(sibling + 1) * HASH_SIZE])
            index //= 2
        return path

    def _check(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.size:
            raise ProtocolError(f"leaf index {index!r} is outside a tree of {self.size} leaves")


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """MTH of ``leaves`` (the leaf data, not their hashes)."""
    return MerkleTree.of_leaves(leaves).root


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of ``leaves[index]`` in the tree of all of ``leaves``."""
    return MerkleTree.of_leaves(leaves).inclusion_proof(index)


def verify_inclusion(leaf_digest: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> bool:
    """True if ``proof`` shows the leaf hashed to ``leaf_digest`` at ``index`` of the tree
    of ``size`` leaves whose root is ``root`` (RFC 9162 section 2.1.3.2)."""
    try:
        if (isinstance(index, bool) or isinstance(size, bool) or not 0 <= index < size
                or any(len(p) != HASH_SIZE for p in proof)
                or len(leaf_digest) != HASH_SIZE):
            return False
        fn, sn, r = index, size - 1, bytes(leaf_digest)
        for p in proof:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = node_hash(bytes(p), r)
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
            else:
                r = node_hash(r, bytes(p))
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == bytes(root)
    except (TypeError, ValueError):
        return False


# -- the receipt tree's signed head and proofs ------------------------------------------------

@dataclass(frozen=True)
class TreeHead:
    """The coordinator's word that ``root`` is the tree of its first ``tree_size`` receipts."""

    run_id: str
    tree_size: int
    root: str  # 64 lowercase hex
    issued_at: float  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        """The signed document: fields checked, ``issued_at`` a float."""
        if not isinstance(self.run_id, str):
            raise ProtocolError("tree head.run_id: expected text")
        if (isinstance(self.tree_size, bool) or not isinstance(self.tree_size, int)
                or self.tree_size < 0):
            raise ProtocolError("tree head.tree_size: expected an int >= 0")
        if not isinstance(self.root, str) or not HEX64.fullmatch(self.root):
            raise ProtocolError("tree head.root: expected 64 lowercase hex")
        if (isinstance(self.issued_at, bool) or not isinstance(self.issued_at, (int, float))
                or not math.isfinite(self.issued_at)):
            raise ProtocolError("tree head.issued_at: expected a finite number")
        return {"issued_at": float(self.issued_at), "root": self.root, "run_id": self.run_id,
                "tree_size": self.tree_size}

    @classmethod
    def from_dict(cls, doc: Any) -> TreeHead:
        if not isinstance(doc, Mapping):
            raise ProtocolError("tree head: expected an object")
        check_keys(doc, {"run_id", "tree_size", "root", "issued_at"}, "tree head")
        head = cls(**doc)
        head.to_dict()  # type checks
        return head


def tree_head_bytes(head: TreeHead) -> bytes:
    """The exact bytes the coordinator signs for ``head`` (module docstring)."""
    return TREE_HEAD_PREFIX + canonical_json(head.to_dict())


@dataclass(frozen=True)
class SignedTreeHead:
    head: TreeHead
    signature: bytes  # DER ECDSA-SHA256 over tree_head_bytes(head)

    def verifies(self, coordinator_pem: bytes | str) -> bool:
        try:
            data = tree_head_bytes(self.head)
        except (ProtocolError, AttributeError, TypeError):
            return False
        return verify(coordinator_pem, data, bytes(self.signature))


def sign_tree_head(head: TreeHead, key: ec.EllipticCurvePrivateKey) -> SignedTreeHead:
    return SignedTreeHead(head, sign(key, tree_head_bytes(head)))


@dataclass(frozen=True)
class ReceiptProof:
    """One signed receipt, where it sits in the receipt tree, and its audit path."""

    signed: SignedReceipt
    leaf_index: int
    audit_path: tuple[bytes, ...]

    def included_in(self, head: TreeHead) -> bool:
        """True if this receipt's signed bytes are leaf ``leaf_index`` of ``head``'s tree.
        (Whether the receipt's signature verifies is ``verify_receipt``'s question.)"""
        try:
            digest = leaf_hash(receipt_bytes(self.signed.receipt))
            root = bytes.fromhex(head.root)
        except (ProtocolError, AttributeError, TypeError, ValueError):
            return False
        return verify_inclusion(digest, self.leaf_index, head.tree_size, self.audit_path, root)

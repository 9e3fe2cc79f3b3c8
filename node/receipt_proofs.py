"""``atom-node credits --proof``: this node's receipts are in the coordinator's receipt tree.

The coordinator commits to every receipt it issued with one Merkle root (``protocol.merkle``),
which it can publish, e.g. in a model card. A node checks its own part of that promise: the
tree head is signed by the pinned coordinator key, every receipt is signed by it and made out
to this node, and every receipt's audit path leads to the head's root. As with a statement,
one failure fails the whole answer; nothing of it is shown as valid.

With ``--root`` the head must carry exactly that root. The coordinator proves against its
current tree only, so a root printed earlier matches only while no receipt was issued since;
otherwise the error says the proofs are against a different root, and of how many receipts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocol import coordinator_pb2 as pb
from protocol.errors import ConfigError, ProtocolError, VerificationError
from protocol.merkle import ReceiptProof, SignedTreeHead, TreeHead
from protocol.receipts import SignedReceipt, verify_receipt
from protocol.signing import fingerprint

from .credits import BadReceipt, ask_coordinator, coordinator_key
from .identity import NodeHome

__all__ = ["ProofLine", "ProofReport", "fetch_proofs", "parse_root", "proofs_report",
           "verify_proofs"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_root(text: str) -> str:
    """A ``--root`` argument as 64 lowercase hex (ConfigError otherwise)."""
    root = text.strip().lower()
    if not _HEX64.fullmatch(root):
        raise ConfigError(f"--root: expected the tree root as 64 hex digits, not {text!r}")
    return root


def _from_reply(reply: pb.ReceiptProofReply) -> tuple[SignedTreeHead, list[ReceiptProof]]:
    """The wire reply as protocol objects; ProtocolError names what is malformed."""
    h = reply.tree_head
    head = TreeHead(run_id=h.run_id, tree_size=h.tree_size, root=h.root, issued_at=h.issued_at)
    head.to_dict()  # type checks: a root that is not hex is the reply's fault, said here
    proofs = []
    for i, p in enumerate(reply.proofs):
        try:
            signed = SignedReceipt.from_dict(json.loads(p.receipt_json))
        except (ValueError, ProtocolError) as err:
            raise ProtocolError(f"receipt #{i + 1} of the proofs is malformed: {err}") from None
        proofs.append(ReceiptProof(signed, p.leaf_index, tuple(p.audit_path)))
    return SignedTreeHead(head, reply.tree_head.signature), proofs


def fetch_proofs(home: NodeHome, *, clock: Callable[[], float] = time.time
                 ) -> tuple[int, SignedTreeHead, list[ReceiptProof]]:
    """``(this node's id, the signed tree head, its receipts' proofs)`` from the coordinator."""
    node_id, reply = ask_coordinator(home, "GetReceiptProofs", "receipt proofs", clock=clock)
    return (node_id, *_from_reply(reply))


@dataclass(frozen=True)
class ProofLine:
    """One receipt proven to be in the tree."""

    update_id: int
    run_id: str
    kind: str
    round: int
    credits: float
    leaf_index: int
    ok: bool = True  # a line exists only for a receipt that passed every check


@dataclass(frozen=True)
class ProofReport:
    node_id: int
    run_id: str
    tree_size: int
    root: str
    issued_at: float
    coordinator_key_fingerprint: str
    lines: list[ProofLine]

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "run_id": self.run_id, "tree_size": self.tree_size,
                "root": self.root, "issued_at": self.issued_at,
                "coordinator_key_fingerprint": self.coordinator_key_fingerprint,
                "receipts_proven": len(self.lines),
                "receipts": [asdict(line) for line in self.lines]}


def verify_proofs(signed: SignedTreeHead, proofs: list[ReceiptProof], coordinator_pem: bytes,
                  node_id: int, root: str | None = None) -> ProofReport:
    """Check the head, then every receipt and its inclusion; the first failure raises
    ``VerificationError`` (``BadReceipt`` for a receipt, named by its update)."""
    head, fp = signed.head, fingerprint(coordinator_pem)
    if not signed.verifies(coordinator_pem):
        raise VerificationError("bad_tree_head", "the receipt tree head does not verify with "
                                f"coordinator key {fp}")
    if root is not None and head.root != root:
        raise VerificationError(
            "other_root", f"the coordinator proves against root {head.root} ({head.tree_size} "
            f"receipts), not {root}: a different tree, e.g. receipts issued since that root")
    seen_updates: set[int] = set()
    seen_leaves: set[int] = set()
    lines = []
    for proof in proofs:
        update_id = getattr(proof.signed.receipt, "update_id", "?")
        try:
            verify_receipt(proof.signed, coordinator_pem, node_id)
        except VerificationError as err:
            raise BadReceipt(update_id, err.reason) from None
        if update_id in seen_updates or proof.leaf_index in seen_leaves:
            raise BadReceipt(update_id, "duplicate", "appears twice")
        if not proof.included_in(head):
            raise BadReceipt(update_id, "bad_inclusion_proof",
                             f"is not in the receipt tree of root {head.root}")
        seen_updates.add(update_id)
        seen_leaves.add(proof.leaf_index)
        r = proof.signed.receipt
        lines.append(ProofLine(r.update_id, r.run_id, r.kind, r.round, float(r.amount),
                               proof.leaf_index))
    return ProofReport(node_id, head.run_id, head.tree_size, head.root, head.issued_at, fp,
                       lines)


def proofs_report(home: NodeHome, *, key_file: Path | None = None, root: str | None = None,
                  clock: Callable[[], float] = time.time) -> ProofReport:
    """Fetch this node's receipt proofs and verify them against the pinned key (and
    ``root``, 64 hex, when given)."""
    wanted = None if root is None else parse_root(root)
    pem = coordinator_key(home, key_file)
    node_id, signed, proofs = fetch_proofs(home, clock=clock)
    return verify_proofs(signed, proofs, pem, node_id, wanted)

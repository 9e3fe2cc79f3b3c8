"""Credit statements: a node's signed receipts, handed only to that node.

The request is signed by the node's own key (``statement_request_bytes``) and carries a
timestamp; it is honoured within ``WINDOW_S`` of the coordinator's clock, so a captured request
stops working after a few minutes. The statement is the ledger's receipts for that node as
stored (the coordinator signed each when it paid the credit or charged the penalty), sealed
here as a whole so that none can be dropped from a saved copy (``protocol.receipts``).
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import ProtocolError, Reason, VerificationError
from protocol.merkle import ReceiptProof, SignedTreeHead, sign_tree_head
from protocol.receipts import (
    Receipt, SignedReceipt, Statement, seal_statement, statement_request_bytes,
)
from protocol.signing import verify

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.accounting.receipt_tree import receipt_tree
from coordinator.ledger import CreditReceipt
from coordinator.ledger.reads import LedgerReads

__all__ = ["StatementDesk", "WINDOW_S", "signed_receipt"]

WINDOW_S = 300.0
CLOCK_SKEW = "clock_skew"


def signed_receipt(row: CreditReceipt) -> SignedReceipt:
    """A ledger receipt row as the protocol object."""
    return SignedReceipt(Receipt.from_dict(json.loads(row.body)), base64.b64decode(row.signature))


@dataclass
class StatementDesk:
    ledger: LedgerReads
    run_id: str
    issuer: ReceiptIssuer  # the coordinator key, which seals each statement
    clock: Callable[[], float] = time.time
    window_s: float = WINDOW_S

    def statement(self, node_id: int, timestamp: float, signature: bytes) -> Statement:
        """The statement of ``node_id`` if the request is that node's, signed and fresh.

        Raises
        ------
        VerificationError
            ``unknown_node``, ``clock_skew`` or ``bad_signature``.
        """
        self._authorise(node_id, timestamp, signature)
        receipts = [signed_receipt(row) for row in self.ledger.receipts(node_id)]
        return seal_statement(node_id, self.run_id, receipts, self.issuer.key, self.clock())

    def receipt_proofs(self, node_id: int, timestamp: float, signature: bytes
                       ) -> tuple[SignedTreeHead, list[ReceiptProof]]:
        """The signed head of the tree of every receipt and the proofs of ``node_id``'s
        receipts in it, for the same request as its statement (same refusals)."""
        self._authorise(node_id, timestamp, signature)
        tree = receipt_tree(self.ledger)
        head = sign_tree_head(tree.head(self.run_id, self.clock()), self.issuer.key)
        mine = [(row.id, signed_receipt(row)) for row in self.ledger.receipts(node_id)]
        return head, tree.proofs(mine)

    def _authorise(self, node_id: int, timestamp: float, signature: bytes) -> None:
        """Return if the request is ``node_id``'s own, signed by its key and fresh."""
        node = self.ledger.node(node_id)
        if node is None:
            raise VerificationError(Reason.UNKNOWN_NODE, f"no node {node_id} is enrolled")
        skew = self.clock() - timestamp
        if not math.isfinite(skew) or abs(skew) > self.window_s:
            raise VerificationError(CLOCK_SKEW, f"request timestamp is {skew:+.0f} s off the "
                                    f"coordinator's clock (allowed ±{self.window_s:.0f} s)")
        try:
            data = statement_request_bytes(node_id, timestamp)
        except ProtocolError as err:
            raise VerificationError(Reason.MALFORMED, str(err)) from None
        if not verify(node.public_key_pem, data, signature):
            raise VerificationError(Reason.BAD_SIGNATURE,
                                    f"request is not signed by node {node_id}'s key")

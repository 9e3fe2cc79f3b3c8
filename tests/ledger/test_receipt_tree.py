"""The receipt tree read from the ledger, on both backends: every receipt in id order, paged,
and one node's proofs against the tree's root."""

from __future__ import annotations

import json

from coordinator.accounting.credits import ReceiptIssuer, pay_credit
from coordinator.accounting.receipt_tree import receipt_tree
from coordinator.accounting.statements import signed_receipt
from coordinator.config import CreditsParams
from coordinator.ledger import Ledger
from protocol.merkle import EMPTY_ROOT, merkle_root
from protocol.messages import Lease, Update, UpdateMetrics
from protocol.receipts import receipt_bytes
from protocol.signing import generate_key


def _pay(ledger: Ledger, make, issuer: ReceiptIssuer, node_id: int, at: float) -> None:
    row = make.lease(node_id)
    upd = make.answer(row, tokens=512)
    lease = Lease(run_id=row.run_id, round=row.round, shard_id=row.shard_id, kind="train",
                  base_version=0, base_digest="a" * 64, data_start=row.data_start,
                  data_end=row.data_end, data_digest="b" * 64, inner_steps=1, batch_size=1,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  seq_len=8, lr=0.001, weight_decay=0.0, seed=1, deadline=row.deadline,
                  nonce=row.nonce)
    update = Update(lease=lease, node_id=node_id, arrays_digest="ab" * 32,
                    metrics=UpdateMetrics(512, 1, 3.5, 3.4, 0.1))
    pay_credit(ledger, CreditsParams(), issuer, node_id=node_id, lease=lease, update=update,
               update_id=upd.id, now=at)


def test_receipt_bodies_page_through_every_receipt_in_id_order(ledger: Ledger, inst,
                                                              make) -> None:
    a, b = make.node(inst.id), make.node(inst.id)
    assert ledger.receipt_bodies() == []
    for i in range(7):
        node = (a, b)[i % 3 == 0]
        upd = make.answer(make.lease(node.id))
        body = json.dumps({"node_id": node.id, "update_id": upd.id, "amount": 1.0})
        ledger.add_credit(node.id, upd.id, 1.0, {}, receipt=(body, b"s"))
    want = [(r.id, r.body) for r in ledger.receipts()]
    assert len(want) == 7
    pages, after = [], 0
    while page := ledger.receipt_bodies(after_id=after, limit=3):
        pages.append(page)
        after = page[-1][0]
    assert [len(p) for p in pages] == [3, 3, 1] and sum(pages, []) == want
    assert ledger.receipt_bodies(after_id=want[-1][0]) == []


def test_receipt_tree_commits_to_every_receipt_and_proves_each_nodes(ledger: Ledger, inst,
                                                                    make) -> None:
    empty = receipt_tree(ledger)
    assert (empty.size, empty.root_hex, empty.proofs([])) == (0, EMPTY_ROOT.hex(), [])
    issuer = ReceiptIssuer(generate_key())
    a, b = make.node(inst.id), make.node(inst.id)
    for i in range(9):
        _pay(ledger, make, issuer, (a, b)[i % 4 == 1].id, at=1000.0 + i)
    rows = ledger.receipts()
    tree = receipt_tree(ledger, page=4)  # three pages
    assert tree.size == 9
    assert tree.root_hex == merkle_root(receipt_bytes(signed_receipt(r).receipt)
                                        for r in rows).hex()
    head = tree.head("run-1", 2000.0)
    assert (head.tree_size, head.root, head.run_id) == (9, tree.root_hex, "run-1")
    for node in (a, b):
        mine = [(r.id, signed_receipt(r)) for r in ledger.receipts(node_id=node.id)]
        proofs = tree.proofs(mine)
        assert [p.leaf_index for p in proofs] == [i for i, r in enumerate(rows)
                                                 if r.node_id == node.id]
        assert [p.signed for p in proofs] == [s for _, s in mine]
        assert all(p.included_in(head) for p in proofs)
    # a receipt issued after the tree was read is not in it: no proof for it, yet
    _pay(ledger, make, issuer, a.id, at=3000.0)
    mine = [(r.id, signed_receipt(r)) for r in ledger.receipts(node_id=a.id)]
    assert len(tree.proofs(mine)) == len(mine) - 1
    newer = receipt_tree(ledger)
    assert newer.size == 10 and newer.root_hex != tree.root_hex
    assert len(newer.proofs(mine)) == len(mine)

"""The run loop with a receipt issuer (as the ServerApp builds it): every credit it pays
comes with a receipt signed by the coordinator key, and rejected or late work gets none."""

from __future__ import annotations

import pytest
from test_run_loop import (  # noqa: F401  (fixtures)
    corpus, network, nets, one_torch_thread,
)

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.accounting.statements import signed_receipt
from node.credits import CreditReport
from protocol.receipts import verify_receipt
from protocol.signing import generate_key, public_key_pem

CREDITS = """
[credits]
train_per_1k_tokens = 2.0
eval_per_1k_tokens = 0.5
"""


def run_loop(network, specs: list[str],  # type: ignore[no-untyped-def]  # noqa: F811
             verify: str = "spot_check_rate = 0"):
    """Run one round of ``specs`` nodes with a receipt issuer; returns (ledger, key, nodes)."""
    key = generate_key()
    net = network(specs, rounds=1, verify=verify, extra=CREDITS, run_id="receipt-loop",
                  issuer=ReceiptIssuer(key))
    net.run()
    data = net.loop.corpus
    assert net.transport.sent and all(  # every lease names the run's tokenizer and data
        (s.lease.tokenizer_digest, s.lease.data_manifest) ==
        (data.tokenizer_digest, data.data_manifest) for s in net.transport.sent)
    return net.ledger, key, net.nodes


def test_every_credit_of_the_loop_has_a_valid_receipt(network, corpus) -> None:  # noqa: F811
    ledger, key, _ = run_loop(network, ["honest", "late"])
    credits = {c.update_id: c for c in ledger.credits()}
    receipts = {r.update_id: signed_receipt(r) for r in ledger.receipts()}
    updates = ledger.updates()
    assert credits and set(receipts) == set(credits)
    assert {u.id for u in updates if u.verdict == "accepted"} == set(credits)
    assert any(u.reason == "late" for u in updates)
    for update_id, signed in receipts.items():
        verify_receipt(signed, public_key_pem(key), credits[update_id].node_id)
        r = signed.receipt
        assert (r.amount, r.components) == (credits[update_id].amount,
                                            credits[update_id].components_dict())
        assert r.run_id == "receipt-loop"
        assert r.data_manifest == corpus.data_manifest  # which data the work was on
        rate = 2.0 if r.kind == "train" else 0.5
        assert r.amount == round(r.tokens / 1000 * rate, 6)


def test_a_lost_spot_check_is_charged_with_a_signed_penalty(network) -> None:  # noqa: F811
    # partial work (half the steps, all claimed) against an honest checker: the coordinator's
    # recomputation sides with the honest node, and the cheat pays 10 x the shard's worth
    ledger, key, (honest, cheat) = run_loop(network, ["honest", "partial"],
                                            "spot_check_rate = 1.0")
    [lost] = [u for u in ledger.updates(node_id=cheat.id) if u.reason ==
              "spot_check_mismatch"]
    [row] = [r for r in ledger.receipts(node_id=cheat.id) if r.update_id == lost.id]
    signed = signed_receipt(row)
    verify_receipt(signed, public_key_pem(key), cheat.id)
    r = signed.receipt
    claimed = lost.tokens
    assert (r.kind, r.tokens, r.amount) == ("penalty", 0, -10.0 * claimed / 1000 * 2.0)
    assert r.components == {"kind": "penalty", "reason": "spot_check_mismatch",
                            "tokens": claimed, "rate_per_1k": 2.0, "factor": 10.0}
    # the node's own report: paid work and the penalty apart, the total net of it
    mine = [signed_receipt(x).receipt for x in ledger.receipts(node_id=cheat.id)]
    report = CreditReport.of(cheat.id, mine, public_key_pem(key))
    assert report.total.penalties == 1 and report.receipts_verified == len(mine)
    assert report.total.updates == len(mine) - 1
    assert report.total.credits == pytest.approx(sum(x.amount for x in mine))
    assert report.total.credits < 0  # its eval credit does not cover the penalty
    assert [line.kind for line in report.lines][-1] == "penalty"
    summary = {s.node_id: s for s in ledger.node_summaries()}[cheat.id]
    assert summary.credits == pytest.approx(report.total.credits)
    # the honest checker's result was the one aggregated, and it was paid
    [won] = [u for u in ledger.updates(node_id=honest.id) if u.verdict == "accepted"
             and u.tokens == claimed]
    assert {c.update_id for c in ledger.credits(node_id=honest.id)} >= {won.id}

"""The run loop with a receipt issuer (as the ServerApp builds it): every credit it pays
comes with a receipt signed by the coordinator key, and rejected or late work gets none."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from fake_network import FakeClock, FakeTransport, enroll

from coordinator.config import parse_config
from coordinator.credits import ReceiptIssuer
from coordinator.ledger import Ledger
from coordinator.model_store import ModelStore
from coordinator.rounds import RunLoop
from coordinator.statements import signed_receipt
from node.credits import CreditReport
from protocol.receipts import verify_receipt
from protocol.signing import generate_key, public_key_pem
from training.corpus import build_folder_corpus

RUN_TOML = """
[run]
id = "receipt-loop"
rounds = 1
min_nodes = 1
wait_for_nodes_s = 0

[model]
preset = "tiny"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16

[data]
eval_tokens = 256

[train]
inner_steps = 2
batch_size = 2
seq_len = 16
deadline_s = 10

[credits]
train_per_1k_tokens = 2.0
eval_per_1k_tokens = 0.5
"""


def run_loop(tmp_path: Path, specs: list[str], extra: str = ""):
    """Run one round of ``specs`` nodes with a receipt issuer; returns (ledger, key, nodes)."""
    rng = random.Random(3)
    src = tmp_path / "text"
    src.mkdir()
    for i in range(10):
        (src / f"d{i}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef", "gh"])
                                                for _ in range(2000)))
    corpus = build_folder_corpus(src, tmp_path / "corpus", val_every=5)
    cfg = parse_config(RUN_TOML + extra, tmp_path)
    key = generate_key()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    nodes = enroll(ledger, specs)
    clock = FakeClock()
    store = ModelStore.open(tmp_path / "checkpoints", cfg, ledger)
    try:
        RunLoop(cfg, ledger, FakeTransport(nodes, clock), store, corpus, clock=clock,
                sleep=clock.sleep, rng=random.Random(0), issuer=ReceiptIssuer(key)).run()
    finally:
        torch.set_num_threads(before)
    return ledger, key, nodes


def test_every_credit_of_the_loop_has_a_valid_receipt(tmp_path: Path) -> None:
    ledger, key, _ = run_loop(tmp_path, ["honest", "late"])
    with ledger:
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
            rate = 2.0 if r.kind == "train" else 0.5
            assert r.amount == round(r.tokens / 1000 * rate, 6)


def test_a_lost_spot_check_is_charged_with_a_signed_penalty(tmp_path: Path) -> None:
    # partial work (half the steps, all claimed) against an honest checker: the coordinator's
    # recomputation sides with the honest node, and the cheat pays 10 x the shard's worth
    ledger, key, (honest, cheat) = run_loop(tmp_path, ["honest", "partial"],
                                            "[verify]\nspot_check_rate = 1.0\n")
    with ledger:
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

"""The run loop with a receipt issuer (as the ServerApp builds it): every credit it pays
comes with a receipt signed by the coordinator key, and rejected or late work gets none."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from fake_network import FakeClock, FakeTransport, enroll

from coordinator.config import parse_config
from coordinator.credits import ReceiptIssuer
from coordinator.ledger import Ledger
from coordinator.model_store import ModelStore
from coordinator.rounds import RunLoop
from coordinator.statements import signed_receipt
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


def test_every_credit_of_the_loop_has_a_valid_receipt(tmp_path: Path) -> None:
    rng = random.Random(3)
    src = tmp_path / "text"
    src.mkdir()
    for i in range(10):
        (src / f"d{i}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef", "gh"])
                                                for _ in range(2000)))
    corpus = build_folder_corpus(src, tmp_path / "corpus", val_every=5)
    cfg = parse_config(RUN_TOML, tmp_path)
    key = generate_key()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        honest, late = enroll(ledger, ["honest", "late"])
        clock = FakeClock()
        store = ModelStore.open(tmp_path / "checkpoints", cfg, ledger)
        try:
            RunLoop(cfg, ledger, FakeTransport([honest, late], clock), store, corpus,
                    clock=clock, sleep=clock.sleep, issuer=ReceiptIssuer(key)).run()
        finally:
            torch.set_num_threads(before)
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

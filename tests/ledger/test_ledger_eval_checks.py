"""Checked evaluations in the ledger, on SQLite and PostgreSQL: what a published validation
loss is made of, and a lost eval check counting like a lost spot check (trust, probation,
penalty). Last, the run loop with one lying evaluator writing to each backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from coordinator.ledger import Ledger
from coordinator.verify.trust import trust_score
from protocol.errors import LedgerError, Reason

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the fake network

from test_run_loop import corpus, make_net, one_torch_thread  # noqa: E402,F401  (fixtures)


def test_a_published_loss_names_its_accepted_sources(ledger: Ledger, inst, make) -> None:
    node = make.node(inst.id)
    ledger.add_model_version(0, "00" * 32, "v0", 0, n_updates=0, tokens=0)
    good = [make.answer(make.lease(node.id, kind="eval")) for _ in range(2)]
    lie = make.answer(make.lease(node.id, kind="eval"), verdict="rejected",
                      reason=Reason.EVAL_MISMATCH)
    with pytest.raises(LedgerError, match="rejected"):
        ledger.set_val_loss(0, 2.5, 3000, update_ids=[good[0].id, lie.id])
    v0 = ledger.versions()[0]  # one transaction: nothing of the refused write is kept
    assert (v0.val_loss, ledger.version_evals(0)) == (None, [])
    ledger.set_val_loss(0, 2.5, 3000, update_ids=[u.id for u in good], windows_recomputed=4,
                        local_tokens=1023)
    v0 = ledger.versions()[0]
    assert (v0.val_loss, v0.val_tokens, v0.val_windows_recomputed, v0.val_local_tokens) == (
        2.5, 3000, 4, 1023)
    assert [u.id for u in ledger.version_evals(0)] == [u.id for u in good]


def test_a_lost_eval_check_counts_like_a_lost_spot_check(ledger: Ledger, inst, make) -> None:
    liar, honest = make.node(inst.id), make.node(inst.id)
    make.answer(make.lease(liar.id))
    lie = make.answer(make.lease(liar.id, kind="eval"), verdict="rejected",
                      reason=Reason.EVAL_MISMATCH)
    make.answer(make.lease(honest.id))
    make.answer(make.lease(honest.id, kind="eval"), verdict="rejected", reason="late")
    trust = {s.node_id: s.trust for s in ledger.node_summaries()}
    assert trust[liar.id] == pytest.approx(trust_score(1, 1, 1))
    assert trust[honest.id] == pytest.approx(trust_score(1, 0))  # a late eval costs no trust
    assert ledger.lost_spot_check_within(5) == {liar.id}
    for _ in range(5):  # five accepted train updates serve the probation
        make.answer(make.lease(liar.id))
    assert ledger.lost_spot_check_within(5) == set()
    entry = ledger.add_penalty(liar.id, lie.id, -0.5, {"kind": "penalty",
                                                      "reason": Reason.EVAL_MISMATCH})
    assert entry.amount == -0.5


@pytest.mark.parametrize("lie", ["eval_lie", "eval_subtle"])
def test_the_run_publishes_only_checked_losses(tmp_path: Path, corpus, ledger_url: str,
                                               lie: str) -> None:
    net = make_net(tmp_path, corpus, ["honest", lie], rounds=1, ledger_url=ledger_url)
    try:
        net.run()
        honest, liar = net.nodes
        led = net.ledger
        for v in led.versions():
            sources = led.version_evals(v.version)
            assert sources and {u.node_id for u in sources} == {honest.id}
            assert v.val_local_tokens > 0 and v.val_windows_recomputed > 0
        lies = [u for u in led.updates(node_id=liar.id) if u.reason == Reason.EVAL_MISMATCH]
        assert len(lies) == 2  # versions 0 and 1
        assert sum(c.amount for c in led.credits(node_id=liar.id)
                   if c.update_id in {u.id for u in lies}) < 0
        assert liar.id in led.lost_spot_check_within(5)
    finally:
        net.ledger.close()

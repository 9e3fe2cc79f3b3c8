"""The ledger reads behind coordinator.services.views, and the views themselves, on both backends."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coordinator.ledger import Ledger
from coordinator.services.views import network_view, node_detail, progress_view


def test_reads_for_views(ledger: Ledger, make) -> None:
    uni = ledger.add_institution("Uni A")
    alice, bob = make.node(uni.id, name="alice"), make.node(uni.id, name="bob")
    assert ledger.latest_lease() is None and ledger.accepted_work() == []
    first = make.answer(make.lease(alice.id), tokens=100, at=150.0, wall_s=10.0)
    ledger.add_credit(alice.id, first.id, 0.1, {"kind": "train", "tokens": 100})
    make.answer(make.lease(alice.id, kind="eval"), tokens=50, at=160.0)
    make.answer(make.lease(bob.id), verdict="rejected", reason="late", tokens=7, at=170.0)
    open_lease = make.lease(bob.id)

    assert ledger.latest_lease() == open_lease
    assert ledger.accepted_work() == [(150.0, 100, 10.0)]
    assert ledger.accepted_work("eval") == [(160.0, 50, 1.5)]
    assert ledger.accepted_work(since=150.0) == []
    pairs = ledger.updates_with_leases(alice.id)
    assert [(u.tokens, lease.kind) for u, lease in pairs] == [(100, "train"), (50, "eval")]
    assert len(ledger.updates_with_leases()) == 3
    (only_bob,) = ledger.node_summaries(bob.id)
    assert (only_bob.name, only_bob.rejected) == ("bob", 1)
    assert ledger.node_summaries(alice.id) == [s for s in ledger.node_summaries()
                                               if s.node_id == alice.id]


def test_views_on_this_backend(ledger: Ledger, make) -> None:
    uni = ledger.add_institution("Uni A")
    alice = make.node(uni.id, name="alice")
    upd = make.answer(make.lease(alice.id), tokens=1000, at=150.0)
    ledger.add_credit(alice.id, upd.id, 1.0, {"kind": "train", "tokens": 1000})
    ledger.touch_node(alice.id, 190.0)
    ledger.add_model_version(0, "00" * 32, "v0", 0, n_updates=0, tokens=0, val_loss=5.0,
                             created_at=100.0)
    view = network_view(ledger, now=200.0)
    (row,) = view.nodes
    assert (row.status, row.tokens, row.credits, row.acceptance_rate) == ("idle", 1000, 1.0, 1.0)
    assert view.header.tokens_per_s == pytest.approx(1000 / view.header.window_s)
    assert progress_view(ledger).losses[0].val_loss == 5.0
    detail = node_detail(ledger, alice.id, now=200.0)
    assert detail.credits[0].components == {"kind": "train", "tokens": 1000}
    json.dumps(dataclasses.asdict(detail))

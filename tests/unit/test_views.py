"""coordinator.services.views on the fixture ledger: the numbers people see, computed once."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from coordinator.ledger import Ledger
from coordinator.services.views import (
    ONLINE_WINDOW_S, THROUGHPUT_WINDOW_S, events_view, network_view, node_detail, node_status,
    progress_view, run_info,
)
from protocol.errors import LedgerError
from tests.fixture_ledger import NOW, T0, FixtureRun


@pytest.fixture
def ledger(fixture_ledger: FixtureRun) -> Iterator[Ledger]:
    led = Ledger.read_only(fixture_ledger.url)
    yield led
    led.close()


def test_statuses_cover_working_idle_offline(ledger: Ledger) -> None:
    rows = {r.name: r for r in network_view(ledger, NOW).nodes}
    assert {n: r.status for n, r in rows.items()} == {
        "aurora": "working", "borealis": "idle", "cygnus": "offline", "draco": "offline"}
    assert rows["aurora"].current_shard == "train 4"
    assert rows["borealis"].current_shard == ""


def test_node_status_rules() -> None:
    class _Lease:
        deadline = 100.0

    assert node_status(None, None, 50.0) == "offline"
    assert node_status(50.0 - ONLINE_WINDOW_S, None, 50.0) == "idle"
    assert node_status(49.0 - ONLINE_WINDOW_S, None, 50.0) == "offline"
    # Training longer than the online window: working until the deadline passes.
    assert node_status(0.0, _Lease(), 90.0) == "working"  # type: ignore[arg-type]
    assert node_status(0.0, _Lease(), 101.0) == "offline"  # type: ignore[arg-type]
    assert node_status(50.0, _Lease(), 50.0, revoked=True) == "revoked"  # type: ignore[arg-type]


def test_rows_agree_with_node_summaries(ledger: Ledger) -> None:
    rows = {r.node_id: r for r in network_view(ledger, NOW).nodes}
    for s in ledger.node_summaries():
        r = rows[s.node_id]
        assert (r.name, r.institution, r.accepted, r.rejected, r.tokens, r.eval_tokens,
                r.credits, r.last_seen) == (s.name, s.institution, s.accepted, s.rejected,
                                            s.tokens, s.eval_tokens, s.credits, s.last_seen)
    assert rows[2].acceptance_rate == pytest.approx(0.75)
    assert rows[4].acceptance_rate is None


def test_header(ledger: Ledger, fixture_ledger: FixtureRun) -> None:
    header = network_view(ledger, NOW, run_id="from-config").header
    assert header.run.run_id == "from-config"
    assert (header.run.round, header.run.version, header.run.val_loss) == (3, 2, 3.0)
    assert (header.online, header.nodes) == (2, 4)
    # Only borealis's round-3 shard (40,960 tokens, 25 s ago) is inside the window.
    assert header.tokens_per_s == pytest.approx(40_960 / THROUGHPUT_WINDOW_S)
    assert run_info(ledger).run_id == fixture_ledger.run_id  # from the latest lease


def test_progress(ledger: Ledger) -> None:
    view = progress_view(ledger)
    assert [(p.version, p.val_loss) for p in view.losses] == [(0, 5.5), (1, 3.2), (2, 3.0)]
    train_tokens = sum(s.tokens for s in ledger.node_summaries())
    assert sum(p.tokens for p in view.throughput) == pytest.approx(train_tokens, abs=len(view.throughput))
    starts = [p.start for p in view.throughput]
    assert starts == sorted(starts) and all(b - a == view.bucket_s for a, b in zip(starts, starts[1:]))
    assert len(view.throughput) <= 60
    assert progress_view(ledger, max_buckets=5).bucket_s >= (NOW - T0 - 100) / 5


def test_node_detail(ledger: Ledger) -> None:
    d = node_detail(ledger, 2, NOW)
    assert d.row.name == "borealis"
    assert [(u.round, u.kind, u.verdict, u.reason) for u in d.updates] == [
        (0, "eval", "accepted", None), (1, "train", "accepted", None),
        (2, "train", "rejected", "norm_bound"), (3, "train", "accepted", None)]
    assert "exceeds the bound" in d.updates[2].detail
    assert len(d.credits) == 3 and d.credits[1].components == {
        "kind": "train", "rate_per_1k": 1.0, "tokens": 40_960}
    assert d.credits_by_kind == pytest.approx({"eval": 0.7168, "train": 81.92})
    assert [h.tokens for h in d.history] == [0, 40_960, 81_920]
    assert d.history[-1].credits == pytest.approx(d.row.credits)
    with pytest.raises(LedgerError, match="no node 99"):
        node_detail(ledger, 99, NOW)


def test_events_since(ledger: Ledger) -> None:
    first = events_view(ledger)
    assert first.events[0].kind == "join" and first.last_id == first.events[-1].event_id
    kinds = {e.kind for e in first.events}
    assert {"join", "online", "reject", "reissue", "leave", "version"} <= kinds
    later = events_view(ledger, since_id=first.events[3].event_id)
    assert later.events == first.events[4:]
    assert events_view(ledger, since_id=first.last_id).events == ()
    assert events_view(ledger, since_id=first.last_id).last_id == first.last_id


def test_every_view_is_json(ledger: Ledger) -> None:
    for view in (network_view(ledger, NOW), progress_view(ledger), node_detail(ledger, 1, NOW),
                 events_view(ledger), run_info(ledger)):
        json.dumps(dataclasses.asdict(view))


def test_query_count_does_not_grow_with_nodes(ledger: Ledger) -> None:
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    engine = ledger._engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        network_view(ledger, NOW)
        n_network = len(statements)
        statements.clear()
        node_detail(ledger, 1, NOW)
        n_detail = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert n_network <= 6, statements  # four nodes, yet no per-node query
    assert n_detail <= 5


def test_one_node_summary_is_the_same_row(ledger: Ledger) -> None:
    every = {s.node_id: s for s in ledger.node_summaries()}
    for node_id, summary in every.items():
        assert ledger.node_summaries(node_id) == [summary]
    assert ledger.node_summaries(99) == []


def test_a_penalty_lowers_the_totals_people_see(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from coordinator.accounting.leaderboard import leaderboard
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as led:
        inst = led.add_institution("U")
        cheat = led.add_node(1, "cheat", inst.id, "pem", "fp1")
        good = led.add_node(2, "good", inst.id, "pem", "fp2")

        def work(node, verdict: str, reason: str | None, at: float):  # type: ignore[no-untyped-def]
            lease = led.record_lease(run_id="r", round=1, shard_id=int(at), kind="train",
                                     node_id=node.id, base_version=0, nonce=f"{int(at):032x}",
                                     data_start=0, data_end=1, deadline=NOW + 100)
            return led.record_update(lease_id=lease.id, node_id=node.id, arrays_digest="ab",
                                     verdict=verdict, tokens=1000, steps=1, loss_before=1.0,
                                     loss_after=0.5, wall_s=1.0, reason=reason,
                                     received_at=NOW - 100 + at)
        paid = work(cheat, "accepted", None, 1)
        led.add_credit(cheat.id, paid.id, 1.0, {"kind": "train", "tokens": 1000,
                                                "rate_per_1k": 1.0})
        lost = work(cheat, "rejected", "spot_check_mismatch", 2)
        led.add_penalty(cheat.id, lost.id, -10.0, {"kind": "penalty", "tokens": 1000,
                                                    "rate_per_1k": 1.0, "factor": 10.0})
        fair = work(good, "accepted", None, 3)
        led.add_credit(good.id, fair.id, 1.0, {"kind": "train"})
        d = node_detail(led, cheat.id, NOW)
        assert d.row.credits == pytest.approx(-9.0)
        assert [(h.tokens, h.credits) for h in d.history] == [(1000, 1.0), (1000, -9.0)]
        assert d.credits_by_kind == pytest.approx({"train": 1.0, "penalty": -10.0})
        board = leaderboard(led.node_summaries(), "r", NOW)
        assert [(r.node, r.rank, r.credits) for r in board.nodes] == [
            ("good", 1, 1.0), ("cheat", 2, -9.0)]

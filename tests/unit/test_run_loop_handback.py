"""A node whose policy says pause hands its leases back, through the real run loops (lock-step
and asynchronous) and in-process nodes running ``node.worker.do_work`` with their gate: the
shard is reissued, nothing is credited for it, the node's trust and counts are untouched, the
ledger says why, and the node gets no lease until the time it gave."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY
from test_run_loop import (  # noqa: F401  (fixtures)
    assert_credit_only_for_accepted, corpus, network, nets, one_torch_thread, updates_by_lease,
)

from coordinator.run.loop import _HANDBACK_S
from coordinator.verify.trust import trust_score
from node.pause import LeaseGate
from node.policy import Policy

from fake_network import T0, FakeNode
from loop_world import Net

# T0 is Tuesday 2023-11-14 22:13:20 UTC: this window opens 1,000 s (fake) later
OPENS_S = 1000.0
EVENINGS = 'windows = ["22:30-23:30"]'


def paused_until_evening(net: Net, node: FakeNode, windows: str = EVENINGS) -> None:
    """``node`` works only in ``windows`` (UTC), on the loop's fake clock."""
    policy = Policy.from_toml(windows)
    policy = dataclasses.replace(policy, clock=lambda: datetime.fromtimestamp(net.clock(), UTC))
    node.gate = LeaseGate(policy)


def handed_back_total(kind: str) -> float:
    return REGISTRY.get_sample_value("atom_leases_closed_total",
                                     {"kind": kind, "status": "handed_back"}) or 0.0


def check_nothing_held_against(led, node) -> None:  # type: ignore[no-untyped-def]
    """No update row, credit or trust change for what ``node`` handed back."""
    back = {x.id for x in led.leases(node_id=node.id) if x.status == "handed_back"}
    assert back, "the node handed nothing back: the test checked nothing"
    assert not {u.lease_id for u in led.updates()} & back
    [summary] = led.node_summaries(node.id)
    trained = sum(1 for x, u in updates_by_lease(led) if x.node_id == node.id
                  and x.kind == "train" and u is not None and u.verdict == "accepted")
    # trust is its accepted work's alone: a hand-back is neither a failure nor a rejection
    assert summary.rejected == 0 and summary.trust == trust_score(trained, 0, 0)
    lease_of = {u.id: u.lease_id for u in led.updates()}
    assert all(lease_of[c.update_id] not in back for c in led.credits(node_id=node.id))


def check_every_lease_accounted_for(led) -> None:  # type: ignore[no-untyped-def]
    ups = {u.lease_id for u in led.updates()}
    for lease in led.leases():
        assert lease.status in ("answered", "handed_back"), lease
        assert (lease.id in ups) == (lease.status == "answered"), lease


@pytest.mark.parametrize("windows, wait_s", [
    (EVENINGS, OPENS_S),
    ('windows = ["Wed 08:00-09:00"]', _HANDBACK_S[1]),  # opens in ~10 h: asked again in 1 h
])
def test_a_paused_node_hands_back_and_its_shard_goes_to_another(network, windows: str,
                                                                wait_s: float) -> None:
    net = network(["honest", "honest"], rounds=2)
    good, paused = net.nodes
    paused_until_evening(net, paused, windows)
    before = handed_back_total("train"), handed_back_total("eval")
    net.run()
    led = net.ledger

    # round 1: its train lease and the evaluation queued behind it came back, unworked
    mine = led.leases(node_id=paused.id)
    assert {(x.kind, x.status) for x in mine} == {("train", "handed_back"),
                                                  ("eval", "handed_back")}
    [back] = [x for x in mine if x.kind == "train"]
    assert back.round == 1 and back.closed_at is not None
    # the shard went to the pool front: the other node trained it in round 2
    again = [x for x, u in updates_by_lease(led) if x.kind == "train" and x.round == 2
             and x.node_id == good.id and u is not None and u.verdict == "accepted"]
    assert back.shard_id in {x.shard_id for x in again}
    # nothing for it until its window opens: the run was over long before
    assert all(x.issued_at <= back.closed_at for x in mine)
    events = [e for e in led.events() if e.kind == "handback"]
    assert len(events) == 2  # the train lease and the eval lease
    for event in events:
        assert event.node_id == paused.id and paused.name in event.message
        assert "outside this node's time windows" in event.message
        assert f"no work for it for {wait_s:.0f} s" in event.message
    assert not [e for e in led.events() if e.kind in ("reissue", "reject")]
    check_nothing_held_against(led, paused)
    check_every_lease_accounted_for(led)
    assert_credit_only_for_accepted(led)
    assert [v.version for v in led.versions()] == [0, 1, 2]
    assert all(v.val_loss is not None for v in led.versions())
    assert (handed_back_total("train"), handed_back_total("eval")) == (before[0] + 1,
                                                                       before[1] + 1)


def test_a_lone_paused_node_gets_its_shard_back_when_its_window_opens(network) -> None:
    # round 1 gets nothing done; round 2 waits for the node (lock-step rounds are not redone)
    net = network(["honest"], rounds=2, wait_s=2 * OPENS_S)
    [node] = net.nodes
    paused_until_evening(net, node)
    net.run()
    led = net.ledger
    leases = led.leases(node_id=node.id)
    back = [x for x in leases if x.status == "handed_back"]
    answered = [x for x in leases if x.status == "answered"]
    assert back and answered
    opened = max(x.closed_at for x in back)
    # it was asked again only once the window it named had opened, then it worked
    assert all(x.issued_at >= T0 + OPENS_S for x in answered)
    assert min(x.issued_at for x in answered) - opened >= OPENS_S - 5
    # its shard waits at the pool front for the next node to come (a node is not given back
    # a shard it returned while the pool holds others)
    [shard] = [x.shard_id for x in back if x.kind == "train"]
    taken = net.loop.scheduler.lease_train(3, [999], net.store.version, net.store.digest)
    assert taken[999].shard_id == shard
    check_nothing_held_against(led, node)
    check_every_lease_accounted_for(led)
    assert [v.version for v in led.versions()] == [0, 1]
    assert all(u.verdict == "accepted" for u in led.updates())
    assert all(v.val_loss is not None for v in led.versions())


def asynchronous(**keys: object) -> str:
    return "[async]\nenabled = true\n" + "\n".join(f"{k} = {v}" for k, v in keys.items())


def busy_after(checks: int, node) -> None:  # type: ignore[no-untyped-def]
    """``node``'s GPU is taken by its owner's job after ``checks`` policy checks (an eval
    lease takes two: as it arrives and once its blobs are in)."""
    calls: list[bool] = []

    def probe(working: bool) -> str | None:
        calls.append(working)
        return "the GPU is in use by another process (pid 777; 9,000 MiB)" \
            if len(calls) > checks else None

    node.gate = LeaseGate(Policy(pause_when_gpu_busy=True, busy_retry_s=300.0, probe=probe))


def test_the_async_loop_reissues_what_a_busy_node_hands_back(network) -> None:
    net = network(["honest", "honest"], rounds=3, extra=asynchronous(buffer=1))
    _, paused = net.nodes
    busy_after(2, paused)  # it evaluates version 0, then its owner's job starts
    net.run()
    led = net.ledger
    mine = led.leases(node_id=paused.id)
    assert [(x.kind, x.status) for x in mine] == [("eval", "answered"),
                                                  ("train", "handed_back")]
    back = [x for x in mine if x.kind == "train"]
    done = {x.shard_id for x, u in updates_by_lease(led)
            if x.kind == "train" and u is not None and u.verdict == "accepted"}
    assert {x.shard_id for x in back} <= done  # the other node trained them
    assert all(x.issued_at <= min(y.closed_at for y in back) for x in mine)
    [event] = [e for e in led.events() if e.kind == "handback"]
    assert event.node_id == paused.id and "pid 777" in event.message
    assert "no work for it for 300 s" in event.message
    check_nothing_held_against(led, paused)
    check_every_lease_accounted_for(led)
    assert_credit_only_for_accepted(led)
    assert [v.version for v in led.versions()] == [0, 1, 2, 3]
    assert all(v.val_loss is not None for v in led.versions())

"""The real run loop against well-formed, correctly signed attacks, which only the
round-level checks catch (``coordinator.verify.round_judge``), and its spot checks and trust.

Uses the fake network and fixtures of ``test_run_loop``: a 1-layer, 32-wide model and 3 inner
steps, on a fake clock.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_run_loop import (  # noqa: F401  (fixtures)
    SHARD_TOKENS, assert_credit_only_for_accepted, corpus, credits_by_update, first_outer_step,
    network, nets, one_torch_thread, updates_by_lease,
)

from fake_network import enroll

from coordinator.verify.trust import trust_score
from protocol.errors import Reason
from training.checkpoint import load_checkpoint

ATTACKS = {  # behaviour: (nodes, rounds it attacks in, reason)
    "sign_flip": (["honest", "honest", "sign_flip"], {1, 2}, Reason.NORM_BOUND),
    "noise": (["honest", "honest", "noise"], {1, 2}, Reason.NORM_BOUND),
    "free_rider": (["honest", "free_rider"], {1, 2}, Reason.NOT_USEFUL),
    "copy": (["honest", "honest", "copy"], {1, 2}, Reason.DUPLICATE),
    "reuse": (["honest", "reuse"], {2}, Reason.DUPLICATE),  # round 1: nothing to reuse yet
    "stale": (["honest", "honest", "stale"], {2}, Reason.BASE_MISMATCH),  # round 1: no old base
}


def reject_on_record(ledger, node_id: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A rejected train update of an earlier run (round 0) in the node's history."""
    lease = ledger.record_lease(run_id="old", round=0, shard_id=0, kind="train",
                                node_id=node_id, base_version=0, nonce=f"{node_id:032x}",
                                data_start=0, data_end=1, deadline=0.0)
    ledger.record_update(lease_id=lease.id, node_id=node_id, arrays_digest="",
                         verdict="rejected", tokens=0, steps=0, loss_before=None,
                         loss_after=None, wall_s=None, reason=reason)


def train_updates(net, node_id: int) -> dict[int, object]:
    return {lease.round: u for lease, u in updates_by_lease(net.ledger)
            if lease.node_id == node_id and lease.kind == "train"}


@pytest.mark.parametrize("behaviour", sorted(ATTACKS))
def test_attack_is_rejected_earns_nothing_and_the_run_goes_on(network, behaviour: str) -> None:
    specs, rounds, reason = ATTACKS[behaviour]
    net = network(specs)
    bad = net.nodes[-1]
    net.run()
    led = net.ledger

    mine = train_updates(net, bad.id)
    for rnd in rounds:
        assert (mine[rnd].verdict, mine[rnd].reason) == ("rejected", reason), mine[rnd].detail
        assert not credits_by_update(led).get(mine[rnd].id)
    assert_credit_only_for_accepted(led)
    assert any(e.kind == "reject" and e.node_id == bad.id and reason in e.message
               for e in led.events())

    # every honest update was accepted, scored, and every round made a version
    for node in net.nodes[:-1]:
        for u in train_updates(net, node.id).values():
            assert u.verdict == "accepted", u.detail
            assert u.improvement is not None and "own shard" in u.detail
    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(v.val_loss is not None for v in versions)
    honest = len(specs) - 1
    assert versions[min(rounds)].n_updates == honest
    assert versions[2].val_loss < versions[0].val_loss


def test_free_rider_alone_fails_the_absolute_rule(network) -> None:
    net = network(["free_rider"], rounds=1)
    net.run()
    [u] = train_updates(net, net.nodes[0].id).values()
    assert (u.verdict, u.reason) == ("rejected", Reason.NOT_USEFUL)
    assert u.improvement == 0.0
    assert [v.version for v in net.ledger.versions()] == [0]  # nothing to aggregate


def test_honest_spot_checks_agree_both_earn_and_one_counts(network) -> None:
    net = network(["honest", "honest"], verify="spot_check_rate = 1.0")
    a, b = net.nodes
    net.run()
    led = net.ledger
    pairs = updates_by_lease(led)
    credits = credits_by_update(led)
    versions = led.versions()
    for rnd in (1, 2):
        train = [(lease, u) for lease, u in pairs if lease.kind == "train" and lease.round == rnd]
        assert len(train) == 2 and len({lease.shard_id for lease, _ in train}) == 1
        assert {lease.node_id for lease, _ in train} == {a.id, b.id}
        for _, u in train:  # the copy did real work: it earns too
            assert u.verdict == "accepted" and "spot check" in u.detail
            assert credits[u.id][0].components_dict()["tokens"] == SHARD_TOKENS
        assert train[0][1].arrays_digest == train[1][1].arrays_digest  # CPU: bit-identical
        assert (versions[rnd].n_updates, versions[rnd].tokens) == (1, SHARD_TOKENS)
    events = [e.message for e in led.events() if e.kind == "spot_check"]
    assert len(events) == 2 and all("agree" in m for m in events)
    # only one of the two results went into the step
    v0, _ = load_checkpoint(versions[0].path)
    v1, _ = load_checkpoint(versions[1].path)
    r1 = next(x for n in net.nodes for lease, x in n.answered  # either: they are equal
              if lease.kind == "train" and lease.round == 1)
    want = first_outer_step(v0, r1, net.cfg)
    assert all(np.allclose(v1[k], want[k], atol=1e-6) for k in v0)
    # the shard was consumed once: round 2 trains another one
    shards = {lease.round: lease.shard_id for lease, _ in pairs if lease.kind == "train"}
    assert shards[1] != shards[2]


@pytest.mark.parametrize("behaviour", ["stale_forged", "partial", "free_rider"])
def test_spot_check_mismatch_is_recomputed_and_the_cheat_loses(network, behaviour) -> None:
    net = network(["honest", behaviour], verify="spot_check_rate = 1.0")
    good, bad = net.nodes
    net.run()
    led = net.ledger
    # stale_forged is honest in round 1 (it has no older model yet); the others never are
    rnd = 2 if behaviour == "stale_forged" else 1
    g, b = train_updates(net, good.id)[rnd], train_updates(net, bad.id)[rnd]
    assert g.verdict == "accepted"
    assert (b.verdict, b.reason) == ("rejected", Reason.SPOT_CHECK_MISMATCH)
    assert "recomputation" in b.detail
    # the winner is paid; the loser pays mismatch_penalty x what its claim would have earned
    assert credits_by_update(led)[g.id][0].amount == SHARD_TOKENS / 1000
    [penalty] = credits_by_update(led)[b.id]
    assert penalty.amount == -10.0 * SHARD_TOKENS / 1000
    assert penalty.components_dict() == {"kind": "penalty", "reason": "spot_check_mismatch",
                                         "tokens": SHARD_TOKENS, "rate_per_1k": 1.0,
                                         "factor": 10.0}
    assert_credit_only_for_accepted(led)
    assert net.loop.judge.cost.recomputes >= 1
    [event] = [e.message for e in led.events() if e.kind == "spot_check"
               and f"round {rnd} " in e.message]
    assert f"rejected: {bad.name}" in event
    assert led.versions()[rnd].n_updates == 1

    summary = {s.node_id: s for s in led.node_summaries()}
    train = list(train_updates(net, bad.id).values())
    accepted = sum(u.verdict == "accepted" for u in train)
    mismatches = sum(u.reason == Reason.SPOT_CHECK_MISMATCH for u in train)
    assert summary[bad.id].trust == pytest.approx(
        trust_score(accepted, len(train) - accepted, mismatches))
    assert summary[bad.id].trust < 0.5 < summary[good.id].trust


def test_trust_weighting_scales_the_aggregation_weights(network) -> None:
    net = network(["honest", "honest"], rounds=1, verify="trust_weighting = true\n"
                                                         "spot_check_rate = 0")
    a, b = net.nodes
    led = net.ledger
    # b has one rejected train update on record: trust 1/3 against a's 1/2
    reject_on_record(led, b.id, Reason.NORM_BOUND)
    net.run()
    v0, _ = load_checkpoint(led.versions()[0].path)
    v1, _ = load_checkpoint(led.versions()[1].path)
    [ra] = [x for lease, x in a.answered if lease.kind == "train"]
    [rb] = [x for lease, x in b.answered if lease.kind == "train"]
    wa, wb = 0.5, 1 / 3
    mean = {k: (wa * ra[k] + wb * rb[k]) / (wa + wb) for k in v0}
    want = first_outer_step(v0, mean, net.cfg)
    plain = first_outer_step(v0, {k: (ra[k] + rb[k]) / 2 for k in v0}, net.cfg)
    for k in v0:  # the int8 broadcast rounds each value by at most half its block's scale
        bound = np.abs(want[k] - v0[k]).max() / 254 + 1e-6
        assert np.abs(v1[k] - want[k]).max() <= bound
    assert any(np.abs(v1[k] - plain[k]).max() > np.abs(want[k] - v0[k]).max() / 254 + 1e-6
               for k in v0)  # and it is not the unweighted mean


def test_resume_counts_a_spot_checked_shard_once(tmp_path, corpus, nets) -> None:  # noqa: F811
    from test_run_loop import make_net

    first = make_net(tmp_path, corpus, ["honest", "honest"], rounds=1,
                     verify="spot_check_rate = 1.0")
    nets.append(first)
    first.run()
    [shard] = {lease.shard_id for lease in first.ledger.leases() if lease.kind == "train"}
    first.ledger.close()
    second = make_net(tmp_path, corpus, [], rounds=2, nodes=first.nodes,
                      verify="spot_check_rate = 0")
    nets.append(second)
    assert second.loop.scheduler.epoch == 0  # two accepted results, one shard consumed
    second.run()
    again = [lease.shard_id for lease in second.ledger.leases()
             if lease.kind == "train" and lease.round == 2]
    assert len(again) == 2 and shard not in again
    assert second.loop.scheduler.epoch == 0


def test_spot_checkers_come_from_another_institution(network) -> None:
    # two nodes of one operator and two of another institution, every shard spot-checked:
    # the operator's nodes never check each other, so they could not agree on a forgery
    net = network(["honest", "honest"], rounds=3, verify="spot_check_rate = 1.0")
    net.nodes += enroll(net.ledger, ["honest", "honest"], "Operator X", first=2)
    net.run()
    inst = {n.id: n.row.institution_id for n in net.nodes}
    assert len(set(inst.values())) == 2
    train = [lease for lease, _ in updates_by_lease(net.ledger) if lease.kind == "train"]
    by_shard: dict[tuple[int, int], list[int]] = {}
    for lease in train:
        by_shard.setdefault((lease.round, lease.shard_id), []).append(lease.node_id)
    pairs = [ids for ids in by_shard.values() if len(ids) == 2]
    assert len(pairs) == 6  # 3 rounds x 2 checks
    assert all(inst[a] != inst[b] for a, b in pairs)


def test_no_penalty_when_the_factor_is_zero(network) -> None:
    net = network(["honest", "partial"], rounds=1,
                  verify="spot_check_rate = 1.0\n[credits]\nmismatch_penalty = 0")
    assert net.cfg.credits.mismatch_penalty == 0.0
    net.run()
    [b] = train_updates(net, net.nodes[1].id).values()
    assert (b.verdict, b.reason) == ("rejected", Reason.SPOT_CHECK_MISMATCH)
    assert not credits_by_update(net.ledger).get(b.id)


def test_a_node_that_lost_a_spot_check_is_checked_and_charged_every_round(network) -> None:
    # a past lost spot check on record puts the cheat on probation: at a base rate that
    # would almost never pick it, every one of its shards is checked, and each costs it
    net = network(["honest", "honest", "partial"], rounds=3, verify="spot_check_rate = 0.001")
    cheat = net.nodes[-1]
    led = net.ledger
    reject_on_record(led, cheat.id, Reason.SPOT_CHECK_MISMATCH)
    net.run()
    mine = {rnd: u for rnd, u in train_updates(net, cheat.id).items() if rnd >= 1}
    assert sorted(mine) == [1, 2, 3]
    credits = credits_by_update(led)
    for u in mine.values():
        assert (u.verdict, u.reason) == ("rejected", Reason.SPOT_CHECK_MISMATCH), u.detail
        assert credits[u.id][0].amount == -10.0 * SHARD_TOKENS / 1000
    assert_credit_only_for_accepted(led)
    # the honest nodes were checked only as the cheat's checkers: one of them each round
    for rnd in (1, 2, 3):
        shards = [lease for lease, _ in updates_by_lease(led)
                  if lease.kind == "train" and lease.round == rnd]
        assert len(shards) == 3 and len({s.shard_id for s in shards}) == 2


@pytest.mark.parametrize("loss_tolerance, stands", [(0.02, True), (0.0, False)])
def test_a_bf16_node_that_differs_in_parameters_but_not_in_loss_stands(
        network, loss_tolerance: float, stands: bool) -> None:
    # a CUDA node (bf16) checked against a CPU node (fp32): with the tolerance in parameters
    # made tiny they "differ", the coordinator recomputes in fp32 and sides with the CPU
    # node; the bf16 result stands on its loss on the shard, unless that test is off
    net = network(["honest", "bf16"], rounds=1, verify=f"""spot_check_rate = 1.0
spot_check_tolerance = 1e-12
spot_check_loss_tolerance = {loss_tolerance}""")
    cpu, gpu = net.nodes
    net.run()
    [c], [g] = (list(train_updates(net, n.id).values()) for n in (cpu, gpu))
    assert c.verdict == "accepted" and c.arrays_digest != g.arrays_digest
    assert net.loop.judge.cost.recomputes == 1
    [event] = [e.message for e in net.ledger.events() if e.kind == "spot_check"]
    assert "shard loss" in event if stands else "shard loss" not in event
    if stands:
        assert g.verdict == "accepted" and not credits_by_update(net.ledger)[g.id][0].amount < 0
    else:
        assert (g.verdict, g.reason) == ("rejected", Reason.SPOT_CHECK_MISMATCH)
        assert credits_by_update(net.ledger)[g.id][0].amount < 0

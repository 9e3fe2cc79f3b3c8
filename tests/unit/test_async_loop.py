"""The asynchronous run loop (``coordinator.run.async_loop``) against the in-process fake
network: no round barrier, an outer step per K buffered updates, staleness-weighted.

Nodes with a ``speed`` take simulated time (``fake_network.work_seconds``), so a slow node's
update arrives after faster nodes' updates have made new versions: it is stale, and the loop
must weigh it, rebase it, or reject it beyond ``max_staleness``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_run_loop import (  # noqa: F401  (fixtures)
    assert_credit_only_for_accepted, corpus, network, nets, one_torch_thread,
    updates_by_lease,
)

from coordinator.config import parse_config
from coordinator.run.async_loop import AsyncRunLoop
from coordinator.run.staleness import staleness_factor, update_weight
from protocol.errors import ConfigError, Reason
from training.checkpoint import load_checkpoint

from loop_world import make_net, run_toml

BASE = 100.0  # tokens per fake second of a 1x node
PLAIN_OUTER = "lr = 1.0\nmomentum = 0.0"  # new = current - the weighted mean: checkable by hand


def asynchronous(**keys: object) -> str:
    lines = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
                      for k, v in keys.items())
    return f"[async]\nenabled = true\n{lines}\n"


def with_speeds(net, *speeds: float):  # type: ignore[no-untyped-def]
    start = net.clock()
    for node, s in zip(net.nodes, speeds):
        node.speed, node.free_at = s * BASE, start
    return net


# -- the staleness function ------------------------------------------------------------------

def test_staleness_factor_and_update_weight_by_hand() -> None:
    assert staleness_factor(0, 0.5) == 1.0
    assert staleness_factor(1, 0.5) == pytest.approx(1 / math.sqrt(2))
    assert staleness_factor(3, 0.5) == pytest.approx(0.5)
    assert staleness_factor(3, 1.0) == pytest.approx(0.25)
    assert staleness_factor(5, 0.0) == 1.0  # power 0: staleness ignored
    assert update_weight(1000, 0.5, 3, 0.5) == pytest.approx(250.0)
    assert update_weight(768, 1.0, 0, 2.0) == 768.0
    with pytest.raises(ValueError):
        staleness_factor(-1, 0.5)


def test_async_config_section(tmp_path: Path) -> None:
    cfg = parse_config(run_toml(3, extra=asynchronous(buffer=4, max_staleness=2)), tmp_path)
    a = cfg.asynchronous
    assert (a.enabled, a.buffer, a.max_staleness, a.queue) == (True, 4, 2, 0)
    assert not parse_config(run_toml(3), tmp_path).asynchronous.enabled
    with pytest.raises(ConfigError, match=r"\[async\]\.max_staleness must be a non-negative"):
        parse_config(run_toml(3, extra="[async]\nmax_staleness = -1\n"), tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key \[async\]\.buffers"):
        parse_config(run_toml(3, extra="[async]\nbuffers = 2\n"), tmp_path)


# -- the outer step ---------------------------------------------------------------------------

def test_the_outer_step_weighs_and_rebases_stale_updates_as_documented(network) -> None:
    """Every outer step, checked against the checkpoints: weights tokens x (1 + tau)^-0.5, a
    stale update taken as current - (base - update), and new = current - the weighted mean
    (outer lr 1, no momentum)."""
    net = with_speeds(network(["honest"] * 3, rounds=5, outer=PLAIN_OUTER,
                              extra=asynchronous(buffer=2, queue=0)), 1, 2, 4)
    loop = net.loop
    assert isinstance(loop, AsyncRunLoop)
    steps: list[tuple[int, list, list[float]]] = []
    rebased: dict[str, dict] = {}
    step_arrays, aggregate = loop._step_arrays, loop.aggregator.aggregate

    def spy_step_arrays(c):  # type: ignore[no-untyped-def]
        out = step_arrays(c)
        rebased[c.lease.nonce] = out
        return out

    def spy_aggregate(updates, weights):  # type: ignore[no-untyped-def]
        nonces = [next(n for n, a in rebased.items() if a is u) for u in updates]
        steps.append((net.store.version, nonces, list(weights)))
        return aggregate(updates, weights)

    loop._step_arrays = spy_step_arrays  # type: ignore[method-assign]
    loop.aggregator.aggregate = spy_aggregate  # type: ignore[method-assign]
    net.run()

    ckpt = {v.version: load_checkpoint(v.path)[0] for v in net.ledger.versions()}
    sent = {lease.nonce: (lease, arrays) for n in net.nodes for lease, arrays in n.answered}
    assert [v for v, _, _ in steps] == [0, 1, 2, 3, 4]
    stale = 0
    for version, nonces, weights in steps:
        expect_w, parts = [], []
        for nonce in nonces:
            lease, update = sent[nonce]
            tau = version - lease.base_version
            stale += tau > 0
            tokens = lease.inner_steps * lease.batch_size * lease.seq_len
            expect_w.append(tokens * (1 + tau) ** -0.5)
            parts.append({k: ckpt[version][k] - ckpt[lease.base_version][k] + update[k]
                          for k in update})
        assert weights == pytest.approx(expect_w)
        total = sum(expect_w)
        now = ckpt[version]
        step = {k: now[k] - sum(w * p[k] for w, p in zip(expect_w, parts)) / total for k in now}
        # the version travels int8 ([compression]): each value rounded by at most half its
        # block's scale; not rebuilt bit for bit, since the mean's summation order (ours
        # here against the aggregator's) may put a value on the other side of a rounding
        for k in now:
            bound = np.abs(step[k] - now[k]).max() / 254 + 1e-6
            assert np.abs(ckpt[version + 1][k] - step[k]).max() <= bound, (version, k)
    assert stale > 0, "no stale update was aggregated: the test checked only fresh work"


# -- the run -------------------------------------------------------------------------------

def test_a_mixed_fleet_runs_without_barriers_and_every_version_is_scored(network) -> None:
    net = with_speeds(network(["honest"] * 3, rounds=4, extra=asynchronous(queue=1)), 1, 2, 4)
    net.run()
    led = net.ledger
    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2, 3, 4]
    assert all(v.val_loss is not None and v.val_tokens for v in versions)
    assert versions[-1].val_loss < versions[0].val_loss
    pairs = updates_by_lease(led)
    assert all(lease.status == "answered" for lease, _ in pairs), "a lease was left open"
    assert all(u.verdict == "accepted" for _, u in pairs)
    # K = 3 nodes online: every step but the last (which takes all work out) holds 3+
    assert all(v.n_updates >= 3 for v in versions[1:-1])
    assert sum(v.n_updates for v in versions) == sum(
        1 for lease, _ in pairs if lease.kind == "train")
    # the 4x node was never held back by the 1x one: it trained about 4x the tokens
    tokens = {n.id: 0 for n in net.nodes}
    for lease, u in pairs:
        if lease.kind == "train":
            tokens[lease.node_id] += u.tokens
    assert tokens[net.nodes[2].id] >= 3 * tokens[net.nodes[0].id]
    # queue = 1: every node got its next train lease before it had answered the one before
    for n in net.nodes:
        mine = sorted((x for x, _ in pairs if x.node_id == n.id and x.kind == "train"),
                      key=lambda x: x.issued_at)
        assert any(b.issued_at < a.closed_at for a, b in zip(mine, mine[1:])), n.name
    assert_credit_only_for_accepted(led)


def test_work_beyond_max_staleness_is_rejected_as_stale_base(network) -> None:
    # one update per step: while the 1x node trains, the 4x node makes versions
    net = with_speeds(network(["honest", "honest"], rounds=6, outer=PLAIN_OUTER,
                              extra=asynchronous(buffer=1, queue=0, max_staleness=1)), 1, 4)
    net.run()
    slow = net.nodes[0].id
    mine = [(lease, u) for lease, u in updates_by_lease(net.ledger)
            if lease.node_id == slow and lease.kind == "train" and u is not None]
    stale = [u for _, u in mine if u.reason == Reason.STALE_BASE]
    assert stale, [(x.base_version, u.verdict) for x, u in mine]
    assert all("at most 1 behind" in u.detail for u in stale)
    assert_credit_only_for_accepted(net.ledger)
    assert [v.version for v in net.ledger.versions()] == list(range(7))
    # its shards went back to the pool and were trained again by someone
    done = {lease.shard_id for lease, u in updates_by_lease(net.ledger)
            if lease.kind == "train" and u is not None and u.verdict == "accepted"}
    first = next(lease for lease, u in mine if u.reason == Reason.STALE_BASE)
    assert first.shard_id in done


def test_spot_checks_under_the_async_loop_catch_a_cheat(network) -> None:
    net = network(["honest", "honest", "partial"], rounds=3,
                  verify="spot_check_rate = 1.0\neval_quorum_rate = 0",
                  extra=asynchronous(buffer=2, queue=1))  # a slot free for each copy
    net.run()
    led = net.ledger
    cheat = net.nodes[2].id
    theirs = [u for lease, u in updates_by_lease(led)
              if lease.node_id == cheat and lease.kind == "train" and u is not None]
    lost = [u for u in theirs if u.reason == Reason.SPOT_CHECK_MISMATCH]
    assert lost, [(u.verdict, u.reason) for u in theirs]
    credits = {c.update_id: c.amount for c in led.credits()}
    assert all(credits.get(u.id, 0) < 0 for u in lost)  # the penalty
    assert not any(u.verdict == "accepted" for u in theirs if u.id in {x.id for x in lost})
    events = [e.message for e in led.events() if e.kind == "spot_check"]
    assert any("agree" in m for m in events) and any("rejected" in m for m in events)
    assert_credit_only_for_accepted(led)
    # a shard accepted twice (its pair agreed) is aggregated once
    accepted = {(lease.round, lease.shard_id) for lease, u in updates_by_lease(led)
                if lease.kind == "train" and u is not None and u.verdict == "accepted"}
    assert sum(v.n_updates for v in led.versions()) == len(accepted)


def test_an_eval_lie_is_caught_without_a_barrier(network) -> None:
    net = network(["honest", "honest", "eval_lie"], rounds=3, extra=asynchronous(buffer=2))
    net.run()
    led = net.ledger
    liar = net.nodes[2].id
    lies = [u for lease, u in updates_by_lease(led)
            if lease.node_id == liar and lease.kind == "eval" and u is not None]
    assert lies and all(u.reason == Reason.EVAL_MISMATCH for u in lies)
    assert all(v.val_loss is not None and v.val_loss > 1.0 for v in led.versions())
    assert_credit_only_for_accepted(led)


def test_a_node_that_leaves_mid_lease_costs_only_its_lease(network) -> None:
    net = with_speeds(network(["honest"] * 3, rounds=4, extra=asynchronous(queue=0),
                              train="deadline_s = 30"), 1, 1, 1)
    start = net.clock()
    net.nodes[2].away = (start + 2.0, start + 200.0)
    net.run()
    led = net.ledger
    expired = [x for x in led.leases() if x.status == "expired"]
    assert expired and all(x.node_id == net.nodes[2].id for x in expired)
    assert not [x for x in led.leases() if x.status == "issued"]
    assert [v.version for v in led.versions()] == [0, 1, 2, 3, 4]
    assert all(v.val_loss is not None for v in led.versions())


def test_eval_every_scores_every_kth_version_and_the_last(network) -> None:
    net = network(["honest", "honest"], rounds=5, extra=asynchronous(eval_every=2))
    net.run()
    scored = [v.version for v in net.ledger.versions() if v.val_loss is not None]
    assert scored == [0, 2, 4, 5]


def test_a_node_revoked_mid_run_gets_no_further_lease_and_earns_nothing(network) -> None:
    net = network(["honest", "honest"], rounds=3, extra=asynchronous(buffer=1))
    led, transport = net.ledger, net.transport
    good, bad = net.nodes
    send = transport._send_one  # noqa: SLF001 - one message of a pass

    def send_then_revoke(dst: int, kind: str, content, ttl: float) -> str:  # type: ignore[no-untyped-def]
        mid = send(dst, kind, content, ttl)
        if dst == bad.flower_id and kind == "train":
            led.revoke_node(bad.id)  # revoked while its first train lease is out
        return mid

    transport._send_one = send_then_revoke  # type: ignore[method-assign]  # noqa: SLF001
    net.run()
    theirs = [x for x in led.leases(node_id=bad.id) if x.kind == "train"]
    assert len(theirs) == 1  # no lease after the revocation
    (upd,) = [u for u in led.updates(node_id=bad.id) if u.lease_id == theirs[0].id]
    assert (upd.verdict, upd.reason) == ("rejected", Reason.UNKNOWN_NODE)
    # it earned for the evaluation it answered before the revocation, nothing after
    assert [c.update_id for c in led.credits(node_id=bad.id)
            if c.created_at >= theirs[0].issued_at and c.update_id == upd.id] == []
    # nor an evaluation of any later version
    assert [x.base_version for x in led.leases(node_id=bad.id) if x.kind == "eval"] == [0]
    assert [v.version for v in led.versions()] == [0, 1, 2, 3]  # the run went on
    assert all(u.verdict == "accepted" for u in led.updates(node_id=good.id))


@pytest.mark.parametrize("step_s", [0.3, 0.0])
def test_a_pass_leases_its_nodes_before_an_outer_step_once_steps_are_slow(
        network, step_s: float) -> None:
    """At 1,000 nodes a step takes ~0.6 s: the nodes whose replies the pass took get their
    next leases before it, on the version it supersedes, instead of idling through it. A
    quick step (every other test: the fake clock stands still through one) keeps them for
    the new version, and so does the first of a small fleet (3 updates: ~1.5 ms predicted)."""
    net = with_speeds(network(["honest"] * 3, rounds=5, extra=asynchronous()), 1, 2, 4)
    loop, close, steps = net.loop, net.loop._close_train, []

    def slow_close(rnd, batch):  # type: ignore[no-untyped-def]
        steps.append((net.clock(), loop.store.version))
        net.clock.now += step_s  # the step's work, on the loop's clock
        close(rnd, batch)

    loop._close_train = slow_close  # type: ignore[method-assign]
    net.run()
    pairs = updates_by_lease(net.ledger)
    assert [v.version for v in net.ledger.versions()] == [0, 1, 2, 3, 4, 5]
    # nothing leased beyond the run: the last step's pass counted what the step takes
    assert all(x.status == "answered" and u is not None for x, u in pairs), \
        "a lease was left open"
    assert_credit_only_for_accepted(net.ledger)
    train = [x for x, _ in pairs if x.kind == "train"]
    # leased in a step's pass before it: at its start, on the version it replaced
    before = [[x for x in train if x.issued_at == t and x.base_version == v] for t, v in steps]
    assert len(steps) == 5
    assert before[0] == [], "the first step, predicted quick, made its pass wait"
    if step_s:
        assert any(before[1:]), "no node was leased before a slow step"
    else:
        assert not any(before), "a quick step's pass leased before it"


def test_a_steps_time_is_predicted_from_its_size(network) -> None:
    loop = network(["honest"], rounds=2, extra=asynchronous()).loop
    assert not loop._lease_first(None)  # no step due
    assert not loop._lease_first(3)  # a small fleet's first step: ~1.5 ms
    assert loop._lease_first(1000)  # 1,000 nodes' first: ~0.5 s, leased before it
    loop._step_s_per_update = 0.1  # measured: a slow ledger
    assert loop._lease_first(1)


@pytest.mark.parametrize("buffer", [8, 4])
def test_a_polls_replies_are_leased_before_they_are_screened_unless_a_quick_step_follows(
        network, buffer: int) -> None:
    """The nodes whose replies a poll brought get their next leases before the replies are
    screened: a node waits for the leases before its own, not for the checks of every
    reply that came with it (at 1,000 nodes ~1.4 ms each). When the replies may complete an
    outer step predicted quick (4 of a buffer of 4), they are screened, the step is made,
    and the nodes build on the new version. A poll's replies and leases share one read of
    the revocations."""
    from protocol.messages import parse_work

    net = with_speeds(network(["honest"] * 4, rounds=2, extra=asynchronous(buffer=buffer)),
                      1, 1, 1, 1)  # equal speeds: every round's replies land in one poll
    loop, events = net.loop, []
    screen, send, step = loop._screen, net.transport._send_one, loop._step
    names = {n.id: n.name for n in net.nodes}

    def screening(sent, content, revoked):  # type: ignore[no-untyped-def]
        events.append(("screen", sent.node.id, sent.lease.kind))
        return screen(sent, content, revoked)

    def sending(dst, kind, content, ttl):  # type: ignore[no-untyped-def]
        if kind == "train":
            node = next(n.id for n in net.nodes if n.flower_id == dst)
            events.append(("send", node, parse_work(content).lease.base_version))
        return send(dst, kind, content, ttl)

    def stepping():  # type: ignore[no-untyped-def]
        events.append(("step", None, None))
        return step()

    loop._screen, net.transport._send_one, loop._step = screening, sending, stepping
    calls, looking = [], []  # "poll" and "read" (the revocations) in order
    read_revoked, poll, eligible = net.ledger.revoked_node_ids, net.transport.poll, \
        loop.roster.eligible

    def looking_up():  # type: ignore[no-untyped-def]  # who is online: its own read
        looking.append(1)
        try:
            return eligible()
        finally:
            looking.pop()

    def reading():  # type: ignore[no-untyped-def]
        if not looking:
            calls.append("read")
        return read_revoked()

    loop.roster.eligible, net.ledger.revoked_node_ids = looking_up, reading  # type: ignore[method-assign]
    net.transport.poll = lambda ids: calls.append("poll") or poll(ids)  # type: ignore[method-assign]
    net.run()
    after = ",".join(calls[calls.index("poll"):])  # (the start reads before its first poll)
    assert "read" in after and "read,read" not in after
    # the first train replies (one poll) and their nodes' next leases, after the fan-out
    screens = [i for i, (k, _, kind) in enumerate(events) if k == "screen" and kind == "train"][:4]
    sends = [i for i, (k, _, _) in enumerate(events) if k == "send"][4:8]
    first_step = next(i for i, (k, _, _) in enumerate(events) if k == "step")
    shown = [(k, names.get(n), v) for k, n, v in events]
    assert {events[i][1] for i in screens} == {events[i][1] for i in sends}, shown
    if buffer == 8:  # no step can follow: leased at once, on version 0, then screened
        assert max(sends) < min(screens), shown
        assert {events[i][2] for i in sends} == {0}
    else:  # they complete a quick step: screened, the step, leased on version 1
        assert max(screens) < first_step < min(sends), shown
        assert {events[i][2] for i in sends} == {1}
    assert [v.version for v in net.ledger.versions()] == [0, 1, 2]
    assert all(x.status == "answered" for x, _ in updates_by_lease(net.ledger))


def test_the_schedulers_count_of_work_out_is_the_leases_sent_and_not_answered(network) -> None:
    """What the remaining steps count as work out (``Scheduler.train_out``) is the train
    leases sent and not answered, spot-check copies aside, at every lease pass: through
    copies, a cheat's rejection, an erroring node's failures, a late reply and the
    expiries of a node that left."""
    net = with_speeds(network(["honest", "honest", "partial", "error", "late", "honest"],
                              rounds=3, verify="spot_check_rate = 1.0\neval_quorum_rate = 0",
                              extra=asynchronous(buffer=2, queue=1), train="deadline_s = 30"),
                      1, 1, 1, 1, 1, 1)
    net.nodes[5].away = (net.clock() + 2.0, net.clock() + 200.0)  # it leaves mid-lease
    loop, lease, checked = net.loop, net.loop._lease, []

    def leasing(nodes, stepping=None):  # type: ignore[no-untyped-def]
        sent = sum(1 for x in loop._pending.values()
                   if x.lease.kind == "train" and x.lease.nonce not in loop._copies)
        assert loop.scheduler.train_out() == sent
        checked.append(sent)
        return lease(nodes, stepping)

    loop._lease = leasing  # type: ignore[method-assign]
    net.run()
    assert len(checked) > 10 and max(checked) > 0
    reasons = {u.reason for _, u in updates_by_lease(net.ledger) if u is not None}
    assert {None} < reasons  # something was rejected
    statuses = {x.status for x, _ in updates_by_lease(net.ledger)}
    assert statuses >= {"answered", "failed", "expired"}


def test_a_step_does_not_wait_for_a_spot_check_copy_when_k_updates_are_in(network) -> None:
    from types import SimpleNamespace as NS

    net = network(["honest"] * 3, rounds=5, extra=asynchronous(buffer=3))
    loop = net.loop
    lease = {n: NS(nonce=n, kind="train") for n in ("a", "b", "c", "copy-of-a")}
    loop._buffer.cands = [NS(lease=lease[n], received_at=0.0) for n in "abc"]
    loop._buffer.pairs = [(lease["a"], lease["copy-of-a"])]
    loop._copies = {"copy-of-a"}
    loop._pending = {"msg": NS(lease=lease["copy-of-a"])}  # the copy is still out
    assert [c.lease.nonce for c in loop._ready()[0]] == ["b", "c"]  # a waits for its copy
    # K = 3 fresh updates are in: b and c go now (the leases sent before count them)
    assert loop._step_due(online=3) == 2
    loop._buffer.cands = loop._buffer.cands[:1]  # only a, held: nothing ready
    assert loop._step_due(online=3) is None


def test_an_idle_pass_writes_the_next_shards_before_their_leases(network) -> None:
    """The shard blobs the next leases will name are written while the loop is idle (a
    file per lease written as it went out was half a lease's cost at 1,000 nodes)."""
    from training.shards import shard_bytes

    net = network(["honest", "honest"], rounds=1, extra=asynchronous())
    loop, scheduler = net.loop, net.loop.scheduler
    ahead = scheduler.upcoming(3)
    digests = [scheduler.data_digest(a, b) for a, b in ahead]
    assert len(set(ahead)) == 3 and not any(loop.blobs.has(d) for d in digests)
    loop._publish_ahead(3)
    for (a, b), d in zip(ahead, digests):
        assert bytes(loop.blobs.get(d)) == shard_bytes(loop.tokens[a:b], loop.corpus.dtype)
    net.run()
    first = sorted((x for x in net.ledger.leases() if x.kind == "train"), key=lambda x: x.id)
    assert [(x.data_start, x.data_end) for x in first[:2]] == ahead[:2]  # what was written


# -- the last step's fill ------------------------------------------------------------------

FILL_TRAIN = "inner_steps = 24\nmin_inner_steps = 4\nlr = 3e-3\ndeadline_s = 100"


def _filled_run(tmp_path, corpus, nets, speeds, fill: bool, queue: int = 0):  # type: ignore[no-untyped-def]
    """A 4-step run of nodes of ``speeds`` in a folder of its own. Returns the net, the last
    step's train leases with their updates, and the last train reply's fake time."""
    where = tmp_path / f"fill-{fill}-{queue}"
    where.mkdir()
    net = make_net(where, corpus, ["honest"] * len(speeds), rounds=4, train=FILL_TRAIN,
                   outer=PLAIN_OUTER, extra=asynchronous(fill=fill, queue=queue))
    nets.append(net)
    with_speeds(net, *speeds)
    net.run()
    pairs = updates_by_lease(net.ledger)
    assert all(x.status == "answered" and u is not None for x, u in pairs)
    assert_credit_only_for_accepted(net.ledger)
    train = [(x, u) for x, u in pairs if x.kind == "train"]
    return net, [(x, u) for x, u in train if x.round == 4], max(u.received_at for _, u in train)


def _idle_before_end(net) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """Fake seconds between each node's last train reply and the run's last one."""
    pairs = [(x, u) for x, u in updates_by_lease(net.ledger) if x.kind == "train"]
    end = max(u.received_at for _, u in pairs)
    return {n.id: end - max(u.received_at for x, u in pairs if x.node_id == n.id)
            for n in net.nodes}


def test_the_last_step_fills_the_idle_wait_with_work_sized_to_end_with_it(
        tmp_path, corpus, nets) -> None:
    """A 3x node and two 1x nodes: at the last step one 1x node's lease is still out long
    after the others could be done. Each of them gets one lease sized by its measured speed
    to end with it (24 x 64 tokens at 100 tokens/s is 15.4 fake s), so nobody idles and
    the run ends no later; without ``fill`` they wait."""
    plain, _, plain_end = _filled_run(tmp_path, corpus, nets, (1, 1, 3), fill=False)
    assert max(_idle_before_end(plain).values()) > 10
    net, last, end = _filled_run(tmp_path, corpus, nets, (1, 1, 3), fill=True)
    fills = [(x, u) for x, u in last if u.steps != 24]
    assert {x.node_id for x, _ in fills} == {net.nodes[1].id, net.nodes[2].id}
    assert all(6 <= u.steps for _, u in fills)  # a quarter of a regular lease at least
    assert max(u.steps for _, u in fills) > 24, "the 3x node's fill was not sized to its speed"
    assert end <= plain_end + 0.5  # one pass: the fills cost the run no time
    assert max(_idle_before_end(net).values()) < 2.5
    assert net.ledger.versions()[-1].n_updates >= len(fills) + 1  # the fills are in the step


@pytest.mark.parametrize("speeds", [(1, 2, 4), (1, 3, 3)])
def test_a_fill_never_makes_the_last_step_later(tmp_path, corpus, nets, speeds) -> None:
    """With a lease queued on each node and nodes whose speed is not yet measured when
    their leases went out (the 1x node's first update comes in late), a fill is stacked on
    no node's unfinished work and ends by the slowest lease: the run ends when it would
    have without fills."""
    _, _, plain_end = _filled_run(tmp_path, corpus, nets, speeds, fill=False, queue=1)
    _, _, end = _filled_run(tmp_path, corpus, nets, speeds, fill=True, queue=1)
    assert end <= plain_end + 0.5


def test_a_node_benched_as_it_answers_gets_no_fill(tmp_path, corpus, nets) -> None:
    """The 3x node is the one filled when its last regular reply comes in (the first test);
    benched in that very pass (as a failed check would), while the loop's list of eligible
    nodes is still the one read before, it gets no fill."""
    where = tmp_path / "benched"
    where.mkdir()
    net = make_net(where, corpus, ["honest"] * 3, rounds=4, train=FILL_TRAIN,
                   outer=PLAIN_OUTER, extra=asynchronous())
    nets.append(net)
    with_speeds(net, 1, 1, 3)
    fast, answered = net.nodes[2], net.loop._answered

    def bench_on_reply(sents):  # type: ignore[no-untyped-def]
        if net.loop.store.version == 3 and any(s.node.id == fast.id for s in sents):
            net.loop.roster.bench(fast, "test")
        answered(sents)

    net.loop._answered = bench_on_reply  # type: ignore[method-assign]
    net.run()
    last = [x for x, _ in updates_by_lease(net.ledger) if x.kind == "train" and x.round == 4]
    assert fast.id not in {x.node_id for x in last}
    assert any(x.node_id == net.nodes[1].id for x in last)  # the other fill still went out

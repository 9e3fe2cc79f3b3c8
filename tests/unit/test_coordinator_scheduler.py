from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import pytest

from coordinator.config import TrainParams
from coordinator.run.scheduler import Scheduler, shard_seed

BASE = "b" * 64


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


TOKENIZER, MANIFEST = "7" * 64, "8" * 64  # the run's corpus, as every lease names it


def digest(start: int, end: int) -> str:
    return f"{start:032x}{end:032x}"


def make(n_shards: int = 6, seed: int = 0, clock: Clock | None = None, **train) -> Scheduler:
    counter = itertools.count()
    return Scheduler(run_id="r", shards=[(i, 100 * i, 100 * (i + 1)) for i in range(n_shards)],
                     data_digest=digest, train=TrainParams(deadline_s=60.0, **train), seed=seed,
                     tokenizer_digest=TOKENIZER, data_manifest=MANIFEST,
                     clock=clock or Clock(), nonce=lambda: f"{next(counter):032x}")


def test_lease_fields() -> None:
    clock = Clock()
    s = make(clock=clock)
    leases = s.lease_train(0, [7], base_version=3, base_digest=BASE)
    lease = leases[7]
    t = TrainParams()
    assert (lease.run_id, lease.round, lease.kind, lease.base_version, lease.base_digest) == \
        ("r", 0, "train", 3, BASE)
    assert lease.data_end - lease.data_start == 100 and lease.data_start == 100 * lease.shard_id
    assert lease.data_digest == digest(lease.data_start, lease.data_end)
    assert (lease.tokenizer_digest, lease.data_manifest) == (TOKENIZER, MANIFEST)
    assert (lease.inner_steps, lease.batch_size, lease.seq_len, lease.lr, lease.weight_decay) == \
        (t.inner_steps, t.batch_size, t.seq_len, t.lr, t.weight_decay)
    assert lease.deadline == 1060.0 and lease.nonce == f"{0:032x}"
    assert lease.seed == shard_seed("r", lease.shard_id, 0)
    lease.to_record()  # passes the protocol's own validation


def test_distinct_shards_within_a_round_and_one_lease_per_node() -> None:
    s = make(n_shards=6)
    first = s.lease_train(0, [3, 1, 2, 2], 0, BASE)
    assert sorted(first) == [1, 2, 3]
    assert len({lease.shard_id for lease in first.values()}) == 3
    assert s.lease_train(0, [1, 2, 3], 0, BASE) == {}  # each already holds one
    more = s.lease_train(0, [1, 4, 5, 6], 0, BASE)
    assert sorted(more) == [4, 5, 6]
    ids = [lease.shard_id for lease in [*first.values(), *more.values()]]
    assert sorted(ids) == list(range(6))  # every shard of the epoch once
    assert s.lease_train(0, [8], 0, BASE) == {}  # all out: nothing, even in a new epoch
    assert s.lease_for(4) == more[4] and s.lease_for(8) is None
    assert len(s.outstanding()) == 6


def test_more_nodes_than_shards() -> None:
    s = make(n_shards=2)
    got = s.lease_train(0, range(5), 0, BASE)
    assert len(got) == 2 and {lease.shard_id for lease in got.values()} == {0, 1}


def test_accepted_consumes_rejected_returns_to_front() -> None:
    s = make(n_shards=6)
    a = s.lease_train(0, [1, 2], 0, BASE)
    assert s.answered(a[1], accepted=True)
    assert s.answered(a[2], accepted=False)
    assert not s.answered(a[2], accepted=True)  # no longer open: ignored
    b = s.lease_train(1, [3], 0, BASE)
    assert b[3].shard_id == a[2].shard_id and b[3].seed == a[2].seed
    assert b[3].nonce != a[2].nonce and b[3].round == 1


def test_expire_then_reissue_to_another_node() -> None:
    clock = Clock()
    s = make(clock=clock)
    a = s.lease_train(0, [1, 2], 0, BASE)
    clock.t += 30
    assert s.expire() == []
    s.answered(a[2], accepted=True)
    clock.t += 31  # a[1] is past its deadline
    assert s.expire() == [a[1]]
    assert s.outstanding() == [] and s.lease_for(1) is None
    b = s.lease_train(1, [3], 1, BASE)
    assert b[3].shard_id == a[1].shard_id and b[3].seed == a[1].seed
    assert b[3].deadline == clock.t + 60 and b[3].base_version == 1


def test_expired_lease_blocks_until_expire_runs() -> None:
    clock = Clock()
    s = make(n_shards=1, clock=clock)
    a = s.lease_train(0, [1], 0, BASE)
    clock.t += 100
    assert s.lease_train(1, [2], 0, BASE) == {}  # shard still out until expire()
    assert s.expire() == [a[1]]
    assert s.lease_train(1, [2], 0, BASE)[2].shard_id == a[1].shard_id


def test_release_returns_shard_first() -> None:
    s = make()
    a = s.lease_train(0, [1, 2, 3], 0, BASE)
    assert s.release(a[3], reason="node_error")
    assert not s.release(a[3], reason="again")
    b = s.lease_train(0, [3, 4], 0, BASE)
    assert b[4].shard_id == a[3].shard_id  # first in line, to a node that did not return it
    assert b[3].shard_id != a[3].shard_id


def test_rejected_shard_goes_to_another_node_round_after_round() -> None:
    # observed: a lying node (lowest id) held one shard for five rounds
    s = make(n_shards=4)
    liar, honest = 1, 2
    mine = s.lease_train(0, [liar, honest], 0, BASE)
    bad = mine[liar].shard_id
    s.answered(mine[liar], accepted=False)
    s.answered(mine[honest], accepted=True)
    nxt = s.lease_train(1, [liar, honest], 0, BASE)
    assert nxt[honest].shard_id == bad and nxt[liar].shard_id != bad
    s.answered(nxt[honest], accepted=True)  # done by someone else: the mark is cleared
    s.answered(nxt[liar], accepted=False)
    again = s.lease_train(2, [liar, honest], 0, BASE)
    assert again[honest].shard_id == nxt[liar].shard_id


def test_returned_shard_goes_back_to_its_node_when_no_other_can_take_it() -> None:
    s = make(n_shards=1)
    a = s.lease_train(0, [1], 0, BASE)[1]
    s.answered(a, accepted=False)
    assert s.lease_train(1, [1], 0, BASE)[1].shard_id == a.shard_id  # alone: no one else


def test_expired_shard_avoids_its_node_too() -> None:
    clock = Clock()
    s = make(n_shards=3, clock=clock)
    a = s.lease_train(0, [1], 0, BASE)[1]
    clock.t += 100
    s.expire()
    assert s.lease_train(1, [1], 0, BASE)[1].shard_id != a.shard_id
    assert s.lease_train(1, [2], 0, BASE)[2].shard_id == a.shard_id


def test_eval_copy_goes_to_another_node_holding_eval_leases() -> None:
    s = make()
    ev = s.lease_eval(0, [1, 2], 0, BASE, [(0, 64)])
    copy = s.lease_eval_copy(0, 2, ev[1][0])
    assert (copy.data_start, copy.data_end, copy.shard_id) == (
        ev[1][0].data_start, ev[1][0].data_end, ev[1][0].shard_id)
    assert copy.nonce != ev[1][0].nonce and s.node_of(copy) == 2
    with pytest.raises(ValueError):
        s.lease_eval_copy(0, 1, ev[1][0])  # not to its own node
    with pytest.raises(ValueError):
        s.lease_eval_copy(0, 2, ev[1][0])  # nor twice to one node
    assert s.answered(copy, accepted=False)  # a copy's outcome returns nothing to the pool


def test_eval_copy_of_a_range_the_node_holds_for_the_previous_version() -> None:
    # version 0's evaluation is still queued on node 2 when version 1's is planned: the same
    # range of another version is other work, and its copy may go there (found end to end)
    s = make()
    old = s.lease_eval(0, [2], 0, BASE, [(0, 64)])[2]
    new = s.lease_eval(1, [1], 1, "b" * 64, [(0, 64)])[1]
    assert old[0].data_start == new[0].data_start
    copy = s.lease_eval_copy(1, 2, new[0])
    assert copy.base_version == 1 and s.node_of(copy) == 2
    with pytest.raises(ValueError):
        s.lease_eval_copy(1, 2, new[0])  # the same range of the same version: once


def test_epochs_reshuffle_with_seed_plus_epoch() -> None:
    s = make(n_shards=5, seed=4)
    order = []
    for r in range(3):
        for _ in range(5):
            lease = s.lease_train(r, [1], 0, BASE)[1]
            order.append(lease.shard_id)
            assert lease.seed == shard_seed("r", lease.shard_id, s.epoch)
            s.answered(lease, accepted=True)
    assert s.epoch == 2
    epochs = [order[i:i + 5] for i in range(0, 15, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled
    again = make(n_shards=5, seed=4)
    first = [again.lease_train(0, [i], 0, BASE)[i].shard_id for i in range(5)]
    assert first == epochs[0]  # same seed, same order
    other = make(n_shards=5, seed=5)
    assert [other.lease_train(0, [i], 0, BASE)[i].shard_id for i in range(5)] != first


def test_new_epoch_skips_shards_still_out() -> None:
    s = make(n_shards=3)
    a = s.lease_train(0, [1, 2], 0, BASE)
    s.answered(a[1], accepted=True)
    s.lease_train(1, [1], 0, BASE)  # the last shard of epoch 0
    # epoch 1 begins; a[2]'s shard is still out, so node 3 gets a different one
    c = s.lease_train(1, [3], 0, BASE)
    assert s.epoch == 1 and c[3].shard_id != a[2].shard_id
    assert len({lease.shard_id for lease in s.outstanding()}) == 3


def test_seeds_are_deterministic_and_distinct() -> None:
    assert shard_seed("r", 1, 0) == shard_seed("r", 1, 0)
    seeds = {shard_seed(run, sid, ep) for run in ("r", "q") for sid in range(20) for ep in range(3)}
    assert len(seeds) == 120 and all(0 <= x < 2**63 for x in seeds)


def test_duplicate_hook_for_spot_checks() -> None:
    s = make()
    a = s.lease_train(0, [1], 0, BASE)[1]
    dup = s.lease_duplicate(0, 2, a)
    assert (dup.shard_id, dup.seed, dup.data_digest, dup.base_digest) == \
        (a.shard_id, a.seed, a.data_digest, a.base_digest)
    assert dup.nonce != a.nonce and s.lease_for(2) == dup
    with pytest.raises(ValueError):
        s.lease_duplicate(0, 1, a)  # not to the same node
    s.answered(dup, accepted=False)  # a rejected copy does not requeue the shard
    s.answered(a, accepted=True)
    later = [s.lease_train(1, [n], 0, BASE)[n].shard_id for n in range(3, 8)]
    assert a.shard_id not in later


def test_eval_split_evenly() -> None:
    s = make(seq_len=10)
    out = s.lease_eval(2, [5, 6, 7], 4, BASE, ranges=[(1000, 1050), (2000, 2045)])
    # 10 blocks of <=10 tokens: 3 + 3 + 4, cut on block boundaries
    spans = {n: [(x.data_start, x.data_end) for x in ls] for n, ls in out.items()}
    assert spans == {5: [(1000, 1030)], 6: [(1030, 1050), (2000, 2010)],
                     7: [(2010, 2045)]}
    leases = [x for ls in out.values() for x in ls]
    assert [x.shard_id for x in leases] == [0, 1, 2, 3]
    for x in leases:
        assert (x.kind, x.inner_steps, x.round, x.base_version) == ("eval", 0, 2, 4)
        assert x.data_digest == digest(x.data_start, x.data_end)
        x.to_record()
    assert s.leases_for(6) == out[6] and s.lease_for(6) == out[6][0]
    # A node that is evaluating takes a train lease queued behind it: that lease's deadline
    # counts from when the evaluation is due, not from now.
    train = s.lease_train(2, [5, 8], 4, BASE)
    assert train.keys() == {5, 8}
    assert train[5].deadline == out[5][0].deadline + 60.0
    assert train[8].deadline == out[5][0].deadline  # node 8 holds nothing: it starts now
    # one evaluation of a version per node; the next version's may queue behind it
    assert s.lease_eval(2, [5], 4, BASE, ranges=[(1000, 1050)]) == {}
    later = s.lease_eval(3, [5], 5, BASE, ranges=[(1000, 1050)])
    assert later[5][0].deadline == train[5].deadline + 60.0
    assert s.answered(out[5][0], accepted=False)  # rejected eval: nothing returns to the pool


def test_eval_more_nodes_than_blocks() -> None:
    s = make(seq_len=100)
    out = s.lease_eval(0, [1, 2, 3], 0, BASE, ranges=[(0, 150)])
    assert {n: [(x.data_start, x.data_end) for x in ls] for n, ls in out.items()} == \
        {1: [(0, 100)], 2: [(100, 150)]}


def test_restore_continues_where_a_previous_scheduler_stopped() -> None:
    first = make(n_shards=5, seed=3)
    consumed, rejected_once = [], False
    for r in range(7):  # crosses into the second epoch, with one rejection on the way
        lease = first.lease_train(r, [1], 0, BASE)[1]
        accept = rejected_once or r != 2
        rejected_once = rejected_once or not accept
        first.answered(lease, accepted=accept)
        if accept:
            consumed.append(lease.shard_id)
    resumed = make(n_shards=5, seed=3)
    resumed.restore(consumed)
    for r in range(7, 12):
        a, b = first.lease_train(r, [1], 0, BASE)[1], resumed.lease_train(r, [1], 0, BASE)[1]
        assert (a.shard_id, a.seed) == (b.shard_id, b.seed)
        first.answered(a, accepted=True)
        resumed.answered(b, accepted=True)
    assert resumed.epoch == first.epoch


def test_received_lease_waits_for_its_verdict_past_the_deadline() -> None:
    clock = Clock()
    s = make(clock=clock)
    held, gone = s.lease_train(0, [1, 2], 0, BASE).values()
    assert s.received(held) and not s.received(dataclasses.replace(held, nonce="f" * 32))
    clock.t += 61.0  # both past the deadline: only the unanswered one expires
    assert s.expire() == [gone]
    assert s.outstanding() == [held]
    assert s.answered(held, accepted=False)  # the round's verdict closes it ...
    again = s.lease_train(1, [3, 4], 0, BASE)
    # ... and the rejected and the expired shard are both leased again first
    assert {lease.shard_id for lease in again.values()} == {held.shard_id, gone.shard_id}


def test_eval_split_in_proportion_to_speed() -> None:
    s = make()
    # 12 blocks of seq_len over a 1x, a 2x and a node of unknown speed (counted at the
    # median of the known: 2x): 12 x 1/5, 2/5, 2/5 -> 2.4, 4.8, 4.8 blocks -> cuts 2, 7, 12
    seq = s._train.seq_len
    ev = s.lease_eval(0, [1, 2, 3], 0, BASE, [(0, 12 * seq)], {1: 100.0, 2: 200.0})
    sizes = {n: sum(x.data_end - x.data_start for x in ls) // seq for n, ls in ev.items()}
    assert sizes == {1: 2, 2: 5, 3: 5}



def test_depth_queues_train_leases_and_a_received_one_frees_its_slot() -> None:
    # the asynchronous loop: a node works on up to ``depth`` train leases at once
    clock = Clock()
    s = make(n_shards=8, clock=clock)
    first = s.lease_train(1, [1, 2], 0, BASE, depth=2)
    second = s.lease_train(1, [1, 2], 0, BASE, depth=2)
    assert sorted(first) == sorted(second) == [1, 2]
    assert s.lease_train(1, [1, 2], 0, BASE, depth=2) == {}  # both slots taken
    assert s.train_slots([1, 2, 3], depth=2) == [3]
    # the queued lease's deadline counts from when the one before it is due
    assert second[1].deadline == first[1].deadline + 60.0
    assert s.received(first[1])  # its reply is in, waiting for a verdict: the slot is free
    assert s.train_slots([1, 2], depth=2) == [1]
    third = s.lease_train(2, [1, 2], 1, BASE, depth=2)
    assert list(third) == [1] and third[1].base_version == 1
    assert len({x.shard_id for x in [*first.values(), *second.values(), third[1]]}) == 5
    # a spot check's copy also takes a slot, and only a free one
    with pytest.raises(ValueError):
        s.lease_duplicate(1, 2, first[1], depth=2)
    copy = s.lease_duplicate(1, 3, first[1], depth=2)
    assert copy.shard_id == first[1].shard_id and s.train_slots([3], depth=1) == []


def test_a_node_that_always_holds_its_next_lease_gets_deadlines_that_do_not_run_away() -> None:
    # a queued lease's deadline counts from now plus what is allowed for the work ahead of
    # it, not from that work's deadline: else each new lease would be due later than the
    # last by a whole allowance, and a lost lease of a busy node would never expire
    clock = Clock()
    s = make(n_shards=20, clock=clock)
    first = s.lease_train(1, [1], 0, BASE, depth=2)[1]
    ahead = s.lease_train(1, [1], 0, BASE, depth=2)[1]
    assert (first.deadline, ahead.deadline) == (1060.0, 1120.0)
    for _ in range(10):
        clock.t += 10.0
        s.received(first)
        s.answered(first, accepted=True)
        first, ahead = ahead, s.lease_train(1, [1], 0, BASE, depth=2)[1]
        assert ahead.deadline == clock.t + 120.0  # now + the one ahead + its own


def test_the_per_node_index_agrees_with_the_open_leases_through_any_history() -> None:
    """``train_slots``, ``leases_for``, deadlines, the shards out and ``expire`` read
    indexes kept beside the open leases (counts by node, a deadline heap): after every
    operation of a long random history they equal a full scan."""
    import random

    clock = Clock()
    s = make(n_shards=9, clock=clock)
    rng = random.Random(3)
    nodes = list(range(1, 8))

    def scan(kind: str, depth: int) -> list[int]:
        held = {n: sum(1 for e in s._open.values() if e.node_id == n and e.lease.kind == kind
                       and not (kind == "train" and e.received)) for n in nodes}
        return [n for n in nodes if held[n] < depth]

    for step in range(400):
        op = rng.choice(["lease", "lease", "dup", "eval", "receive", "answer", "release",
                         "expire", "tick"])
        open_ = s.outstanding()
        if op == "lease":
            s.lease_train(1, rng.sample(nodes, 3), 0, BASE, depth=2)
        elif op == "dup" and (train := [x for x in open_ if x.kind == "train"]):
            orig = rng.choice(train)
            free = [n for n in s.train_slots(nodes, 2) if n != s.node_of(orig)]
            if free:
                s.lease_duplicate(1, rng.choice(free), orig, depth=2)
        elif op == "eval":
            s.lease_eval(1, rng.sample(nodes, 2), step, BASE, [(0, 64)])
        elif op in ("receive", "answer", "release") and open_:
            x = rng.choice(open_)
            if op == "receive":
                s.received(x)
            elif op == "answer":
                s.answered(x, accepted=rng.random() < 0.7)
            else:
                s.release(x, reason="test")
        elif op == "expire":
            late = [e.lease for e in s._open.values()
                    if clock.t > e.lease.deadline and not e.received]
            assert s.expire() == late, step
        elif op == "tick":
            clock.t += rng.choice([1.0, 30.0])
        for depth in (1, 2):
            assert s.train_slots(nodes, depth) == scan("train", depth), step
        for n in nodes:
            assert s.leases_for(n) == [e.lease for e in s._open.values() if e.node_id == n]
        assert s._shards_out == Counter(e.lease.shard_id for e in s._open.values()
                                        if e.lease.kind == "train"), step
        assert s.train_out() == sum(1 for e in s._open.values() if e.lease.kind == "train"
                                    and not e.received and not e.duplicate), step

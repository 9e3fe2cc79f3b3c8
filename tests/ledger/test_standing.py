"""``coordinator.run.standing``: trust and probation folded in from the verdicts recorded
since the last read equal what the full queries (``node_summaries``,
``lost_spot_check_within``) compute, after every step of a random history."""

from __future__ import annotations

import random

from coordinator.ledger import Ledger
from coordinator.run.standing import Standing
from coordinator.verify.trust import NEW_NODE_TRUST, PROBATION_UPDATES
from protocol.errors import Reason
from tests.ledger.conftest import Make

# (lease kind, verdict, reason): every combination the loop records
OUTCOMES = [("train", "accepted", None), ("train", "rejected", Reason.NOT_USEFUL.value),
            ("train", "rejected", Reason.SPOT_CHECK_MISMATCH.value),
            ("eval", "accepted", None), ("eval", "rejected", Reason.EVAL_MISMATCH.value),
            ("eval", "rejected", Reason.LATE.value), ("tasks", "accepted", None),
            ("tasks", "rejected", Reason.EVAL_MISMATCH.value)]


def test_standing_read_incrementally_equals_the_full_queries(ledger: Ledger) -> None:
    rng = random.Random(5)
    make = Make(ledger)
    inst = ledger.add_institution("Uni A", now=1.0)
    nodes = [make.node(inst.id) for _ in range(6)]
    standing = Standing(ledger)
    for step in range(12):
        for _ in range(rng.randint(0, 9)):
            node = rng.choice(nodes[:5])  # the sixth never answers: a new node's trust
            # lost checks rare, as in a run: probation must both start and end
            kind, verdict, reason = rng.choice(OUTCOMES[:1] * 6 + OUTCOMES)
            make.answer(make.lease(node.id, kind=kind), verdict=verdict, reason=reason)
        standing.refresh()
        full = {s.node_id: s.trust for s in ledger.node_summaries()}
        mine = standing.trust()
        assert {n: mine.get(n, NEW_NODE_TRUST) for n in full} == full, step
        assert standing.probation() == ledger.lost_spot_check_within(PROBATION_UPDATES), step
    assert standing.probation() and len(standing.probation()) < 5  # both states were seen
    standing.refresh()  # nothing new: nothing changes
    assert standing.trust() == mine


def test_a_restart_reads_the_accepted_train_shards_and_the_last_round(ledger: Ledger) -> None:
    """What a restarted run loop replays into its scheduler, read as two columns; the same
    as filtering every lease and update row, which a long run cannot afford at each start."""
    rng = random.Random(9)
    make = Make(ledger)
    inst = ledger.add_institution("Uni A", now=1.0)
    nodes = [make.node(inst.id) for _ in range(3)]
    assert ledger.accepted_train_shards() == [] and ledger.last_train_round() == 0
    for _ in range(40):
        kind, verdict, reason = rng.choice(OUTCOMES)
        lease = make.lease(rng.choice(nodes).id, kind=kind)
        if rng.random() < 0.8:  # some leases never answered
            make.answer(lease, verdict=verdict, reason=reason)
    accepted = {u.lease_id for u in ledger.updates() if u.verdict == "accepted"}
    want = [(x.round, x.shard_id) for x in ledger.leases()
            if x.kind == "train" and x.id in accepted]
    assert ledger.accepted_train_shards() == want and want
    assert ledger.last_train_round() == max(x.round for x in ledger.leases()
                                            if x.kind == "train")

"""Work sized to each node: inner steps and deadline from its measured tokens/s
(``coordinator.run.sizing``), in the scheduler and through the real run loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.run.scheduler import Scheduler
from coordinator.run.sizing import Size, deadline_for, eval_deadline_for, size_lease, tokens_per_s


@dataclass(frozen=True)
class T:
    inner_steps: int = 100
    batch_size: int = 4
    seq_len: int = 50  # 200 tokens per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    deadline_s: float = 300.0
    target_lease_s: float = 60.0
    min_inner_steps: int = 10
    max_inner_steps: int = 1000
    deadline_factor: float = 3.0
    deadline_slack_s: float = 30.0


def test_speed_is_tokens_over_seconds_of_the_last_five() -> None:
    assert tokens_per_s([]) is None
    assert tokens_per_s([(1000, None), (500, 0.0)]) is None  # nothing usable
    # newest first: (2000 + 1000) / (2 + 4) = 500; the sixth is past the history
    assert tokens_per_s([(2000, 2.0), (1000, 4.0), (0, 1.0), (10, None), (7, 0.0),
                         (10**9, 1.0)]) == 500.0


def test_size_by_hand() -> None:
    t = T()
    # 60 s x 500 tok/s / 200 tok per step = 150 steps; 3 x 150 x 200 / 500 + 30 = 210 s
    assert size_lease(t, 500.0) == Size(150, 210.0)
    assert size_lease(t, 10.0) == Size(10, 3 * 10 * 200 / 10 + 30)  # clamped up
    assert size_lease(t, 1e6) == Size(1000, 3 * 1000 * 200 / 1e6 + 30)  # clamped down
    assert size_lease(t, None) == Size(100, 300.0)  # calibration: the configured lease
    off = T(target_lease_s=0.0)
    assert size_lease(off, 500.0) == Size(100, 300.0)
    # a spot check's copy keeps the original's steps: its deadline follows the checker
    assert deadline_for(t, 150, 1000.0) == 3 * 150 * 200 / 1000 + 30
    assert deadline_for(t, 400, None) == 300.0 * 4  # unknown speed: deadline_s per 100 steps
    assert deadline_for(off, 400, 1000.0) == 300.0
    # an evaluation of 5000 tokens by a node training 500 tok/s: 3 x 10 s + 30 s
    assert eval_deadline_for(t, 5000, 500.0) == 60.0
    assert eval_deadline_for(t, 5000, None) == 300.0  # unknown speed: deadline_s
    assert eval_deadline_for(off, 5000, 500.0) == 300.0


def test_scheduler_sizes_each_node_and_a_copy_to_its_checker() -> None:
    now = 1000.0
    s = Scheduler(run_id="r", shards=[(i, i * 100, i * 100 + 100) for i in range(4)],
                  data_digest=lambda a, b: "d" * 64, train=T(), clock=lambda: now,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64)
    leases = s.lease_train(1, [1, 2, 3], 0, "b" * 64, {1: 500.0, 2: 100.0})
    assert [leases[n].inner_steps for n in (1, 2, 3)] == [150, 30, 100]
    assert leases[1].deadline == now + 210.0
    assert leases[2].deadline == now + 3 * 30 * 200 / 100 + 30
    assert leases[3].deadline == now + 300.0
    copy = s.lease_duplicate(1, 4, leases[1], speed=1000.0)
    assert copy.inner_steps == 150 and copy.deadline == now + 3 * 150 * 200 / 1000 + 30


def test_the_run_loop_sizes_leases_from_measured_speed(tmp_path: Path) -> None:
    from loop_world import build_test_corpus, make_net

    net = make_net(tmp_path, build_test_corpus(tmp_path / "corpus"), ["honest", "honest"],
                   rounds=3, train="target_lease_s = 30\nmin_inner_steps = 2\n"
                                   "max_inner_steps = 7")
    net.run()
    by_round: dict[int, set[int]] = {}
    for lease in net.ledger.leases():
        if lease.kind == "train":
            by_round.setdefault(lease.round, set()).add(lease.id)
    steps = {r: {u.steps for u in net.ledger.updates() if u.lease_id in ids}
             for r, ids in by_round.items()}
    # round 1 calibrates (inner_steps = 3); the in-process nodes are fast: 30 s of their
    # work is far more than max_inner_steps, so every later lease is clamped to 7
    assert steps == {1: {3}, 2: {7}, 3: {7}}
    ups = net.ledger.updates()
    assert all(u.verdict == "accepted" for u in ups)
    credits = {c.update_id: c.amount for c in net.ledger.credits()}
    train = [u for u in ups if u.steps]
    assert all(u.tokens == u.steps * 2 * 32 for u in train)  # batch_size x seq_len per step
    # credit follows verified tokens: one rate per token whatever the lease's size
    assert len({round(credits[u.id] / u.tokens, 12) for u in train}) == 1
    net.ledger.close()


def test_min_above_max_is_a_config_error(tmp_path: Path) -> None:
    from coordinator.config import parse_config
    from protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="min_inner_steps must be <= max_inner_steps"):
        parse_config("[train]\nmin_inner_steps = 50\nmax_inner_steps = 10\n", tmp_path)


def test_sizing_keeps_a_mixed_fleet_busy(tmp_path: Path) -> None:
    # what sizing is for, in simulated time (bench/fleet.py): in lock-step rounds a 4x node
    # with the same lease as a 1x node idles three quarters of the time; sized, it does not
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from fleet import run  # noqa: E402

    from loop_world import build_test_corpus

    corpus = build_test_corpus(tmp_path / "corpus")
    got = {}
    for mode in ("fixed", "sized"):
        (tmp_path / mode).mkdir()
        got[mode] = run(mode, [1.0, 4.0], 3, 12, tmp_path / mode, corpus)
    assert got["fixed"]["utilization_min"] < 0.3
    assert got["sized"]["utilization_min"] > 0.6
    assert got["sized"]["tokens_per_s"] > 1.8 * got["fixed"]["tokens_per_s"]


def test_the_asynchronous_loop_reads_each_nodes_speed_once(tmp_path: Path) -> None:
    """The loop reads a node's recent work from the ledger once and then adds what its steps
    record (a read per node each lease pass was 13x the coordinator's time at 1,000 nodes,
    and the read scans the node's whole history: bench/scale.py); what it holds stays
    what the ledger says."""
    from loop_world import build_test_corpus, make_net

    net = make_net(tmp_path, build_test_corpus(tmp_path / "corpus"), ["honest", "honest"],
                   rounds=3, train="target_lease_s = 30\nmin_inner_steps = 2\n"
                                   "max_inner_steps = 7",
                   extra="[async]\nenabled = true\nbuffer = 2\n")
    reads: list[tuple[int, ...]] = []
    read = net.ledger.recent_train_work
    net.ledger.recent_train_work = lambda ids, limit: (  # type: ignore[method-assign]
        reads.append(tuple(ids)) or read(ids, limit))
    net.run()
    assert [v.version for v in net.ledger.versions()] == [0, 1, 2, 3]
    read_ids = [n for r in reads for n in r]
    assert read_ids and len(read_ids) == len(set(read_ids)), "a node's work was read twice"
    held = {n: list(h) for n, h in net.loop.roster._work.items()}  # noqa: SLF001
    assert held == net.ledger.recent_train_work(held, 5) and any(len(h) > 1 for h in held.values())
    steps = [u.steps for u in net.ledger.updates() if u.steps]
    assert 7 in steps, "no lease was sized from the measured speed"
    net.ledger.close()


# -- the asynchronous loop's last-step fill (coordinator.run.fill) ---------------------------

def _work(kind: str, steps: int = 0, tokens: int = 0):  # type: ignore[no-untyped-def]
    from test_protocol_messages import make_lease

    return make_lease(kind=kind, inner_steps=steps, batch_size=4, seq_len=50,
                      data_start=0, data_end=tokens or 1000)


def test_fill_sizes_by_hand() -> None:
    from coordinator.run.fill import fill_sizes, predicted_end

    t = T(target_lease_s=0.0)  # regular leases: inner_steps = 100 (a fill: at least 25)
    train, evaluation = _work("train", 100), _work("eval", tokens=2000)
    # began at 0, 100 steps x 200 tokens at 200 tok/s = 100 s, its eval left out: ends at 100
    slow = (0.0, [train, evaluation], 200.0)
    assert predicted_end(slow, now=10.0, with_evals=False) == 100.0
    assert predicted_end(slow, now=10.0, with_evals=True) == 110.0  # eval at the train rate
    assert predicted_end(slow, now=150.0, with_evals=False) == 150.0  # late: never before now
    # at t = 40: an idle 1,000 tok/s node has 60 s: 0.85 x 60 x 1000 / 200 = 255 steps,
    # deadline 3 x 51 + 30; one still on 10 s of work has 50 s: 212 steps; one with no
    # measured speed, and one whose share is under 25 steps (4 s: 17), get none
    sizes = fill_sizes(t, 40.0, {1: slow, 3: (35.0, [_work("train", 75)], 1000.0)},
                       {2: (40.0, [], 1000.0), 3: (35.0, [_work("train", 75)], 1000.0),
                        4: (40.0, [], None), 5: (96.0, [], 1000.0)})
    assert sizes == {2: Size(255, 183.0), 3: Size(212, 157.2)}
    # nothing held by a node of known speed: no horizon, no fill
    assert fill_sizes(t, 40.0, {1: (0.0, [train], None)}, {2: (40.0, [], 1000.0)}) == {}

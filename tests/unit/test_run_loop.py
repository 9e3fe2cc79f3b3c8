"""The real run loop (``coordinator.run.loop.RunLoop``) against an in-process fake network.

A 1-layer, 32-wide model and 3 inner steps make a shard take milliseconds; the fake clock
moves only when the loop sleeps, so deadlines expire without real waiting.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.config import RunConfig, parse_config
from coordinator.ledger import Ledger
from coordinator.run.loop import RunLoop
from coordinator.run.model_store import ModelStore
from coordinator.run.outer import NesterovOuter
from protocol.compression import apply_delta, encode_delta
from protocol.errors import CheckpointError, Reason
from training.checkpoint import load_checkpoint
from training.corpus import CorpusInfo
from training.evaluate import evaluate

from loop_world import (
    EVAL_TOKENS, NO_DUPLICATES, SHARD_TOKENS, Net, build_test_corpus, make_net, run_toml,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_test_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    # the nodes train in this process: one thread keeps timings steady on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def nets(tmp_path: Path):
    opened: list[Net] = []
    yield opened
    for net in opened:
        net.ledger.close()


@pytest.fixture
def network(tmp_path: Path, corpus: CorpusInfo, nets: list[Net]):
    def factory(specs: list, **kw) -> Net:
        net = make_net(tmp_path, corpus, specs, **kw)
        nets.append(net)
        return net
    return factory


# -- ledger helpers ------------------------------------------------------------------------

def updates_by_lease(ledger: Ledger) -> list[tuple]:
    """(lease row, update row or None) for every lease, in issue order."""
    ups = {u.lease_id: u for u in ledger.updates()}
    return [(lease, ups.get(lease.id)) for lease in ledger.leases()]


def credits_by_update(ledger: Ledger) -> dict[int, list]:
    out: dict[int, list] = {}
    for c in ledger.credits():
        out.setdefault(c.update_id, []).append(c)
    return out


def assert_credit_only_for_accepted(ledger: Ledger) -> None:
    """One credit (>= 0) per accepted update; none for a rejected one, except the one
    penalty (< 0) an update that lost a spot or eval check pays."""
    credits = credits_by_update(ledger)
    for u in ledger.updates():
        got = credits.get(u.id, [])
        if u.verdict == "accepted":
            assert len(got) == 1 and got[0].amount >= 0, u
        elif u.reason in Reason.MISMATCHES and got:
            assert len(got) == 1 and got[0].amount < 0, u
        else:
            assert got == [], u
    assert set(credits) <= {u.id for u in ledger.updates()}


def val_slice(corpus: CorpusInfo) -> tuple[int, int]:
    lo, hi = corpus.val_range
    return lo, min(hi, lo + EVAL_TOKENS)


def broadcast(old: dict, new: dict, cfg: RunConfig) -> dict:
    """The version the run makes of the exact step ``new`` ([compression] broadcast int8)."""
    block = cfg.compression.block
    return apply_delta(old, encode_delta(old, new, block), block)


def first_outer_step(base: dict, delta: dict, cfg: RunConfig) -> dict:
    outer = NesterovOuter(cfg.outer.lr, cfg.outer.momentum, cfg.outer.nesterov)
    return outer.step(base, delta)


# -- 1. all honest ---------------------------------------------------------------------------

def test_honest_nodes_make_versions_that_learn(network, corpus: CorpusInfo) -> None:
    net = network(["honest", "honest"])
    net.run()
    led = net.ledger

    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert [v.round for v in versions] == [0, 1, 2]
    assert all(v.val_loss is not None and v.val_tokens for v in versions)
    assert versions[2].val_loss < versions[1].val_loss < versions[0].val_loss
    assert [(v.n_updates, v.tokens) for v in versions[1:]] == [(2, 2 * SHARD_TOKENS)] * 2
    assert net.store.version == 2 and net.store.digest == versions[2].digest

    pairs = updates_by_lease(led)
    assert all(u is not None and u.verdict == "accepted" for _, u in pairs)
    assert all(lease.status == "answered" for lease, _ in pairs)
    credits = credits_by_update(led)
    for rnd in (1, 2):
        train = [(lease, u) for lease, u in pairs if lease.kind == "train" and lease.round == rnd]
        assert len(train) == 2
        assert {lease.node_id for lease, _ in train} == {n.id for n in net.nodes}
        assert len({lease.shard_id for lease, _ in train}) == 2  # two distinct shards
        for _, u in train:
            [credit] = credits[u.id]
            comp = credit.components_dict()
            assert comp["kind"] == "train" and comp["tokens"] == SHARD_TOKENS == u.tokens
            assert credit.amount == pytest.approx(SHARD_TOKENS / 1000 * 1.0)
    for lease, u in pairs:
        if lease.kind == "eval":
            assert credits[u.id][0].components_dict()["kind"] == "eval"
    assert_credit_only_for_accepted(led)

    # Each version's eval leases (round r evaluates version r) tile the validation slice.
    lo, hi = val_slice(corpus)
    for rnd in (0, 1, 2):
        spans = sorted((lease.data_start, lease.data_end) for lease, _ in pairs
                       if lease.kind == "eval" and lease.round == rnd)
        assert spans[0][0] == lo and spans[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len({lease.node_id for lease, _ in pairs
                    if lease.kind == "eval" and lease.round == rnd}) == 2
        assert versions[rnd].val_tokens == (hi - lo) - len(spans)

    # Version 1 is one outer step on the token-weighted mean of the two updates, broadcast
    # as version 0 + its int8-encoded change: bit for bit what a node rebuilds, and within
    # the int8 rounding (half a block's scale) of the exact step.
    v0, _ = load_checkpoint(versions[0].path)
    v1, _ = load_checkpoint(versions[1].path)
    r1 = [a for n in net.nodes for lease, a in n.answered if lease.kind == "train"
          and lease.round == 1]
    mean = {k: (r1[0][k] + r1[1][k]) / 2 for k in v0}
    want = first_outer_step(v0, mean, net.cfg)
    rebuilt = broadcast(v0, want, net.cfg)
    assert all(np.array_equal(v1[k], rebuilt[k]) for k in v0)
    for k in v0:
        step = (want[k] - v0[k]).reshape(-1)
        bound = np.abs(step).max() / 127 / 2 + 1e-6
        assert np.abs(v1[k] - want[k]).max() <= bound

    kinds = [e.kind for e in led.events()]
    assert kinds.count("version") == 3 and kinds[-1] == "run"
    assert "reject" not in kinds and "reissue" not in kinds


# -- 2. misbehaving nodes next to an honest one ------------------------------------------------

REJECTED = {
    "wrong_key": Reason.BAD_SIGNATURE,
    "tamper": Reason.DIGEST_MISMATCH,
    "nan": Reason.BAD_ENCODING,  # int8 (the default) cannot carry a NaN: its scale is NaN
    "nan-fp32": Reason.NON_FINITE,  # sent uncompressed, the NaN itself is found
    "late": Reason.LATE,
    "replay": Reason.LEASE_MISMATCH,
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_bad_update_is_rejected_and_the_run_goes_on(network, case: str) -> None:
    behaviour, _, fp32 = case.partition("-")
    net = network(["honest", behaviour],
                  extra='[compression]\nscheme = "none"' if fp32 else "")
    good, bad = net.nodes
    net.run()
    led = net.ledger
    # replay is honest in round 1 (it has nothing to replay yet) and replays in round 2
    bad_round = 2 if behaviour == "replay" else 1

    pairs = updates_by_lease(led)
    [(bad_lease, bad_update)] = [(lease, u) for lease, u in pairs if lease.node_id == bad.id
                                 and lease.kind == "train" and lease.round == bad_round]
    assert bad_update is not None and bad_update.verdict == "rejected"
    allowed = {Reason.LEASE_MISMATCH, Reason.STALE_BASE} if behaviour == "replay" else {
        REJECTED[case]}
    assert bad_update.reason in allowed, (bad_update.reason, bad_update.detail)
    assert bad_update.detail and "\n" not in bad_update.detail
    assert bad_lease.status == "answered"
    assert_credit_only_for_accepted(led)
    assert not credits_by_update(led).get(bad_update.id)

    rejects = [e for e in led.events() if e.kind == "reject"]
    assert rejects and all(e.node_id == bad.id for e in rejects)
    assert any(REJECTED[behaviour] in e.message or bad_update.reason in e.message
               for e in rejects)

    # Every round still made a version; the bad round's from the honest update alone.
    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(v.val_loss is not None for v in versions)
    assert versions[bad_round].n_updates == 1
    assert versions[bad_round].tokens == SHARD_TOKENS
    base, _ = load_checkpoint(versions[bad_round - 1].path)
    made, _ = load_checkpoint(versions[bad_round].path)
    [honest] = [a for lease, a in good.answered
                if lease.kind == "train" and lease.round == bad_round]
    if bad_round == 1:  # momentum is empty before the first step: the step is known exactly
        want = broadcast(base, first_outer_step(base, honest, net.cfg), net.cfg)
        assert all(np.array_equal(made[k], want[k]) for k in base)
    [good_update] = [u for lease, u in pairs if lease.node_id == good.id
                     and lease.kind == "train" and lease.round == bad_round]
    assert good_update.verdict == "accepted"

    if behaviour in ("late", "tamper", "wrong_key", "nan"):
        # a rejected shard goes back to the pool front: the next round leases it again
        again = [lease for lease, _ in pairs if lease.kind == "train" and lease.round == 2]
        assert bad_lease.shard_id in {lease.shard_id for lease in again}


def test_silent_node_lease_expires_and_its_shard_is_reissued(network) -> None:
    net = network(["honest", "silent"])
    good, silent = net.nodes
    net.run()
    led = net.ledger

    [lost] = [lease for lease in led.leases(node_id=silent.id) if lease.kind == "train"]
    assert lost.round == 1 and lost.status == "expired"
    assert lost.closed_at is not None and lost.closed_at > lost.deadline
    # it answered version 0's eval (round 0) before going silent on its train shard
    assert [u.lease_id for u in led.updates(node_id=silent.id)] == [
        lease.id for lease in led.leases(node_id=silent.id) if lease.kind == "eval"]
    assert all(c.components_dict()["kind"] == "eval" for c in led.credits(node_id=silent.id))
    reissues = [e for e in led.events() if e.kind == "reissue"]
    assert len(reissues) == 1 and reissues[0].node_id == silent.id
    again = [lease for lease in led.leases() if lease.kind == "train" and lease.round == 2]
    assert lost.shard_id in {lease.shard_id for lease in again}
    # the loop waited for the deadline on the fake clock, not in real time
    assert net.clock.now - net.clock.start >= net.cfg.train.deadline_s

    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(v.val_loss is not None for v in versions)
    assert versions[1].n_updates == 1
    assert all(u.verdict == "accepted" for u in led.updates())
    assert_credit_only_for_accepted(led)


def test_error_reply_fails_the_lease_and_reissues_the_shard(network) -> None:
    net = network(["honest", "error"])
    good, broken = net.nodes
    net.run()
    led = net.ledger

    [failed] = [lease for lease in led.leases(node_id=broken.id) if lease.kind == "train"]
    assert failed.round == 1 and failed.status == "failed"
    assert not [u for u in led.updates(node_id=broken.id) if u.lease_id == failed.id]
    assert all(c.components_dict()["kind"] == "eval" for c in led.credits(node_id=broken.id))
    [reissue] = [e for e in led.events() if e.kind == "reissue"]
    assert reissue.node_id == broken.id and "out of memory" in reissue.message
    again = [lease for lease in led.leases() if lease.kind == "train" and lease.round == 2]
    assert failed.shard_id in {lease.shard_id for lease in again}
    assert [v.version for v in led.versions()] == [0, 1, 2]
    assert_credit_only_for_accepted(led)


def test_a_pass_goes_out_in_one_send_every_node_s_first_lease_before_any_queued_one(
        network) -> None:
    net = network(["honest", "honest", "honest"], rounds=1)
    send, passes = net.transport.send, []

    def recording(msgs):  # type: ignore[no-untyped-def]
        passes.append([(m.dst, m.kind) for m in msgs])
        return send(msgs)

    net.transport.send = recording  # type: ignore[method-assign]
    net.run()
    first = passes[0]  # round 1's training, each with version 0's evaluation queued behind
    fids = sorted(n.flower_id for n in net.nodes)
    assert first == [(f, "train") for f in fids] + [(f, "eval") for f in fids]


def test_a_message_flower_refuses_fails_its_lease_and_the_shard_is_reissued(network) -> None:
    net = network(["honest", "honest"])
    good, refused = net.nodes
    send, first = net.transport.send, []

    def refusing(msgs):  # type: ignore[no-untyped-def]
        mids = send(msgs)
        # the SuperLink answers None for a message it would not take (Flower logs why)
        return [None if m.dst == refused.flower_id and m.kind == "train" and not first
                and not first.append(mid) else mid for m, mid in zip(msgs, mids)]

    net.transport.send = refusing  # type: ignore[method-assign]
    net.run()
    led = net.ledger
    [failed] = [x for x in led.leases(node_id=refused.id) if x.status == "failed"]
    assert failed.kind == "train" and failed.round == 1
    assert any("refused the message" in e.message for e in led.events() if e.kind == "reissue")
    again = [x for x in led.leases() if x.kind == "train" and x.round == 2]
    assert failed.shard_id in {x.shard_id for x in again}
    assert [v.version for v in led.versions()] == [0, 1, 2]
    assert_credit_only_for_accepted(led)


# -- 3. eval gaps are evaluated locally --------------------------------------------------------

def test_eval_part_nobody_answered_is_evaluated_locally(network, corpus: CorpusInfo) -> None:
    net = network(["honest", ("silent", ("eval",))])
    good, mute = net.nodes
    net.run()
    led = net.ledger
    lo, hi = val_slice(corpus)

    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(v.val_loss is not None for v in versions)

    # Version 0 is evaluated (round 0) by both nodes; the silent half expires ...
    evals = [lease for lease in led.leases() if lease.kind == "eval" and lease.round == 0]
    [mine] = [lease for lease in evals if lease.node_id == good.id]
    [gap] = [lease for lease in evals if lease.node_id == mute.id]
    assert gap.status == "expired" and mine.status == "answered"
    assert any(e.kind == "reissue" and e.node_id == mute.id for e in led.events())
    # ... and the coordinator scores that half itself: the loss is the exact token-weighted
    # mean of the two halves, over all of the slice.
    assert versions[0].val_tokens == (hi - lo) - 2
    arrays, _ = load_checkpoint(versions[0].path)
    tokens = corpus.tokens()
    parts = [evaluate(arrays, net.store.spec, np.asarray(tokens[s:e]), seq_len=32, batch_size=2,
                      device="cpu") for s, e in sorted([(mine.data_start, mine.data_end),
                                                       (gap.data_start, gap.data_end)])]
    want = sum(p.loss_sum for p in parts) / sum(p.tokens for p in parts)
    assert versions[0].val_loss == pytest.approx(want, rel=1e-5)
    # eval credit is paid only to the node that evaluated (the mute one trained: its
    # evaluation was queued behind its train lease)
    assert not [c for c in led.credits(node_id=mute.id) if c.components_dict()["kind"] == "eval"]
    assert_credit_only_for_accepted(led)


def test_lone_node_silent_in_eval_is_waited_for_and_every_version_scored(
        network, corpus: CorpusInfo) -> None:
    # The only node trains but never evaluates: each eval lease expires and benches it for
    # 90 s. The loop must wait for it (wait_for_nodes_s) instead of skipping the rounds, and
    # score every version itself.
    net = network([("silent", ("eval",))], rounds=2, wait_s=120)
    net.run()
    led = net.ledger
    lo, hi = val_slice(corpus)
    versions = led.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(v.val_loss is not None and v.val_tokens == (hi - lo) - 1 for v in versions)
    evals = [lease for lease in led.leases() if lease.kind == "eval"]
    assert [(e.round, e.status) for e in evals] == [(r, "expired") for r in (0, 1, 2)]
    assert not any(e.kind == "round" and "skipped" in e.message for e in led.events())
    assert [e.kind for e in led.events()].count("reissue") == 3
    assert_credit_only_for_accepted(led)
    assert all(c.components_dict()["kind"] == "train" for c in led.credits())


# -- 4. resume ---------------------------------------------------------------------------------

def test_resume_continues_from_the_last_version_with_outer_momentum(
        tmp_path: Path, corpus: CorpusInfo, nets: list[Net]) -> None:
    first = make_net(tmp_path, corpus, ["honest", "honest"], rounds=2)
    nets.append(first)
    first.run()
    momentum = first.store.outer.state_dict()
    assert momentum and (tmp_path / "checkpoints" / "outer-state-2.safetensors").exists()
    first.ledger.close()

    second = make_net(tmp_path, corpus, [], rounds=3, nodes=first.nodes)
    nets.append(second)
    assert (second.store.version, second.store.digest) == (2, first.store.digest)
    loaded = second.store.outer.state_dict()
    assert loaded.keys() == momentum.keys()
    assert all(np.array_equal(loaded[k], momentum[k]) for k in momentum)
    v2 = dict(second.store.arrays)
    second.run()

    led = second.ledger
    versions = led.versions()
    assert [(v.version, v.round) for v in versions] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert all(v.val_loss is not None for v in versions)
    train_rounds = sorted({lease.round for lease in led.leases() if lease.kind == "train"})
    assert train_rounds == [1, 2, 3]
    # version 2 already had its val loss: the resumed run does not re-evaluate it
    assert sorted({s.lease.round for s in second.transport.sent}) == [3]

    # v3 = one Nesterov step on the round-3 mean with the *loaded* momentum buffers.
    r3 = [a for n in second.nodes for lease, a in n.answered
          if lease.kind == "train" and lease.round == 3]
    mean = {k: (r3[0][k] + r3[1][k]) / 2 for k in v2}
    outer = NesterovOuter(first.cfg.outer.lr, first.cfg.outer.momentum, first.cfg.outer.nesterov)
    outer.load_state_dict(momentum)
    want = broadcast(v2, outer.step(v2, mean), first.cfg)
    v3, _ = load_checkpoint(versions[3].path)
    assert all(np.array_equal(v3[k], want[k]) for k in v2)
    fresh = broadcast(v2, first_outer_step(v2, mean, first.cfg), first.cfg)
    assert not all(np.allclose(v3[k], fresh[k], atol=1e-6) for k in v2)

    # Running again with nothing left to do changes nothing.
    n_leases = len(led.leases())
    RunLoop(second.cfg, led, second.transport, second.store, corpus, clock=second.clock,
            sleep=second.clock.sleep).run()
    assert len(led.versions()) == 4 and len(led.leases()) == n_leases


def test_resume_does_not_retrain_the_shards_already_consumed(
        tmp_path: Path, corpus: CorpusInfo, nets: list[Net]) -> None:
    first = make_net(tmp_path, corpus, ["honest", "honest"], rounds=1)
    nets.append(first)
    first.run()
    first.ledger.close()
    second = make_net(tmp_path, corpus, [], rounds=2, nodes=first.nodes)
    nets.append(second)
    second.run()
    shards = {r: {lease.shard_id for lease in second.ledger.leases()
                  if lease.kind == "train" and lease.round == r} for r in (1, 2)}
    assert not shards[1] & shards[2]


# -- 5. corrupt checkpoints ----------------------------------------------------------------------

def _ledger_snapshot(led: Ledger) -> str:
    rows = [led.versions(), led.events(), led.leases(), led.updates(), led.credits(),
            led.nodes()]
    return json.dumps([[r.model_dump() for r in table] for table in rows], sort_keys=True)


@pytest.mark.parametrize("damage", ["weights", "meta", "missing", "outer", "outer-missing"])
def test_corrupt_latest_checkpoint_refuses_to_open(tmp_path: Path, damage: str) -> None:
    cfg = parse_config(run_toml(2), tmp_path)
    ckpt = tmp_path / "checkpoints"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as led:
        store = ModelStore.open(ckpt, cfg, led)
        delta = {k: np.full_like(a, 1e-3) for k, a in store.arrays.items()}
        store.advance(delta, led, round=1, n_updates=1, tokens=SHARD_TOKENS)
        latest = Path(led.latest_version().path)
        assert latest.exists()
        if damage == "weights":
            blob = bytearray(latest.read_bytes())
            blob[-100:] = bytes(100)  # zero the tail of the last tensor
            latest.write_bytes(bytes(blob))
        elif damage == "meta":
            latest.with_suffix(".json").write_text("{not json")
        elif damage == "missing":
            latest.unlink()
        elif damage == "outer":
            (ckpt / "outer-state-1.safetensors").write_bytes(b"\x00garbage")
        else:  # the momentum of version 1 is gone: resuming would silently drop it
            (ckpt / "outer-state-1.safetensors").unlink()
        before = _ledger_snapshot(led)

        with pytest.raises(CheckpointError) as err:
            ModelStore.open(ckpt, cfg, led)
        message = str(err.value)
        assert message and "\n" not in message and err.value.exit_code == 6
        assert _ledger_snapshot(led) == before

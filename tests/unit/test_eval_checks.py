"""Evaluation answers are checked, not believed (``coordinator.verify.eval_judge``).

Per reply (``verify.reply.verify``): the windows must be one float64 loss sum per window of the
range, and sum to the claimed total. Per phase: the coordinator recomputes sampled windows,
and quorum pairs are compared. Uses the fake network and fixtures of ``test_run_loop``.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from test_run_loop import (  # noqa: F401  (fixtures)
    assert_credit_only_for_accepted, corpus, make_net, network, nets, one_torch_thread,
    val_slice,
)

from fake_network import EVAL_LIES, enroll

from coordinator.verify.eval_judge import agrees, plan_quorum
from coordinator.verify.reply import Expected, verify
from node.worker import WorkerSettings, do_work
from protocol.blobstore import BlobDir
from protocol.digest import arrays_to_bytes, digest_arrays
from protocol.errors import Reason
from protocol.messages import EVAL_WINDOWS, Lease, eval_window_count, parse_reply, work_content
from protocol.signing import generate_key, public_key_pem, sign_update
from training.checkpoint import load_checkpoint
from training.evaluate import evaluate, window_losses
from training.model import GPTConfig
from training.state import init_arrays

GPT = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)
SEQ = 32


# -- the rule ------------------------------------------------------------------------------

def test_agreement_is_relative_above_one_nat_and_absolute_below() -> None:
    # 100 predictions, reference 2.0 nats/token: 1% of it is 0.02 nats/token = 2 nats summed
    assert agrees(200.0 - 2.0, 200.0, 100, 0.01) and agrees(202.0, 200.0, 100, 0.01)
    assert not agrees(200.0 - 2.01, 200.0, 100, 0.01)
    # reference 0.1 nats/token: the floor is 1% of 1 nat = 1 nat summed, not 0.1
    assert agrees(10.0 - 0.99, 10.0, 100, 0.01) and not agrees(10.0 - 1.01, 10.0, 100, 0.01)
    # the subtle lie, 3% low, is far outside
    assert not agrees(0.97 * 540.0, 540.0, 100, 0.01)


def test_quorum_prefers_another_institution_and_copies_once_per_node() -> None:
    a, b, c = (Lease(run_id="r", round=1, shard_id=i, kind="eval", base_version=0,
                     base_digest="0" * 64, data_start=i * 64, data_end=(i + 1) * 64,
                     data_digest="0" * 64, inner_steps=0, batch_size=2, seq_len=32, lr=0.0,
                     tokenizer_digest="7" * 64, data_manifest="8" * 64,
                     weight_decay=0.0, seed=0, deadline=1.0, nonce=f"{i:032x}")
               for i in range(3))
    leases = {1: [a], 2: [b], 3: [c]}
    inst = {1: 10, 2: 10, 3: 20}
    for seed in range(20):
        plan = plan_quorum(leases, inst, 1.0, random.Random(seed))
        checkers = [n for _, n in plan]
        assert len(checkers) == len(set(checkers))  # at most one copy per node
        owner = {x.nonce: n for n, ls in leases.items() for x in ls}
        assert all(node != owner[lease.nonce] for lease, node in plan)
        first_lease, first_node = plan[0]  # node 1's lease, picked while all were free
        assert (first_lease, first_node) == (a, 3)  # the only node outside institution 10
    assert plan_quorum(leases, inst, 0.0, random.Random(0)) == []


# -- per reply -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_reply(tmp_path_factory: pytest.TempPathFactory):
    """An honest eval lease over 200 random tokens, its node's key and its signed reply."""
    tokens = np.random.default_rng(3).integers(0, 256, 200).astype(np.uint16)
    base = init_arrays(GPT, 0)
    blobs = BlobDir(tmp_path_factory.mktemp("blobs"))
    lease = Lease(run_id="r", round=1, shard_id=0, kind="eval", base_version=0,
                  base_digest=blobs.put(arrays_to_bytes(base)), data_start=1000,
                  data_end=1200, data_digest=blobs.put(tokens.tobytes()), inner_steps=0,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  batch_size=2, seq_len=SEQ, lr=0.0, weight_decay=0.0, seed=0, deadline=2e9,
                  nonce="ab" * 16)
    key = generate_key()
    content = work_content(lease, dataclasses.asdict(GPT))
    update, arrays = parse_reply(do_work(content, WorkerSettings(node_id=7, key=key,
                                                                 device="cpu", cache=blobs)))
    return lease, key, update, arrays, base, tokens


def _verify(lease, key, update, arrays):  # type: ignore[no-untyped-def]
    return verify(update, arrays, Expected(lease=lease, node_id=7,
                                           public_key_pem=public_key_pem(key),
                                           current_version=0, shapes={}, max_norm=1000.0,
                                           now=1.0))


def _forge(key, update, arrays, loss=None):  # type: ignore[no-untyped-def]
    """``update`` over ``arrays``, re-digested and re-signed (a well-formed lie)."""
    metrics = update.metrics if loss is None else dataclasses.replace(
        update.metrics, loss_before=loss, loss_after=loss)
    forged = dataclasses.replace(update, arrays_digest=digest_arrays(arrays), metrics=metrics,
                                 signature=b"")
    return sign_update(forged, key), arrays


def test_honest_reply_commits_to_every_window(eval_reply) -> None:
    lease, key, update, arrays, base, tokens = eval_reply
    w = arrays[EVAL_WINDOWS]
    assert w.dtype == np.float64 and w.shape == (eval_window_count(lease),) == (7,)
    assert w.sum() == pytest.approx(update.metrics.loss_before * update.metrics.tokens)
    assert update.metrics.tokens == 199
    # what the coordinator recomputes for a sample is exactly what the node committed to
    assert np.allclose(window_losses(base, GPT, tokens, [0, 3, 6], seq_len=SEQ), w[[0, 3, 6]],
                       rtol=1e-5)
    v = _verify(lease, key, update, arrays)
    assert v.accepted, v


def test_windows_that_do_not_sum_to_the_total_are_rejected(eval_reply) -> None:
    lease, key, update, arrays, *_ = eval_reply
    w = arrays[EVAL_WINDOWS].copy()
    w[2] *= 0.5  # a lower window, the total left as it was
    v = _verify(lease, key, *_forge(key, update, {EVAL_WINDOWS: w}))
    assert (v.accepted, v.reason) == (False, Reason.METRICS_INCONSISTENT)
    assert "windows sum to" in v.detail


@pytest.mark.parametrize("windows, why", [
    (lambda w: w[:-1], "6 windows"),
    (lambda w: np.concatenate([w, w[:1]]), "8 windows"),
    (lambda w: w.astype(np.float32), "float64"),
    (lambda w: w.reshape(1, -1), "1-D"),
])
def test_wrong_window_layout_is_rejected(eval_reply, windows, why: str) -> None:
    lease, key, update, arrays, *_ = eval_reply
    w = windows(arrays[EVAL_WINDOWS])
    total = float(np.asarray(w, np.float64).sum())
    v = _verify(lease, key, *_forge(key, update, {EVAL_WINDOWS: w},
                                    loss=total / update.metrics.tokens))
    assert (v.accepted, v.reason) == (False, Reason.SHAPE_MISMATCH)
    assert why in v.detail


def test_extra_array_or_negative_window_is_rejected(eval_reply) -> None:
    lease, key, update, arrays, *_ = eval_reply
    extra = {**arrays, "more": np.zeros(2)}
    assert _verify(lease, key, *_forge(key, update, extra)).reason == Reason.SHAPE_MISMATCH
    w = arrays[EVAL_WINDOWS].copy()
    w[0], w[1] = -w[0], w[1] + 2 * w[0]  # same total, one window below zero
    v = _verify(lease, key, *_forge(key, update, {EVAL_WINDOWS: w}))
    assert (v.reason, "negative" in v.detail) == (Reason.METRICS_INCONSISTENT, True)


def test_partial_evaluation_is_rejected(eval_reply) -> None:
    lease, key, update, arrays, *_ = eval_reply
    fewer = dataclasses.replace(update, metrics=dataclasses.replace(update.metrics, tokens=150))
    v = _verify(lease, key, *_forge(key, fewer, arrays))
    assert (v.reason, "range predicts 199" in v.detail) == (Reason.METRICS_INCONSISTENT, True)


# -- per phase, in the run loop --------------------------------------------------------------

def _true_val_loss(net, corpus, version: int) -> float:  # type: ignore[no-untyped-def]
    lo, hi = val_slice(corpus)
    arrays, _ = load_checkpoint(net.ledger.versions()[version].path)
    spans = sorted((lease.data_start, lease.data_end) for lease in net.ledger.leases()
                   if lease.kind == "eval" and lease.round == version)
    spans = sorted(set(spans))  # quorum copies repeat a range
    parts = [evaluate(arrays, net.store.spec, np.asarray(corpus.tokens()[s:e]), seq_len=SEQ,
                      batch_size=2, device="cpu") for s, e in spans]
    return sum(p.loss_sum for p in parts) / sum(p.tokens for p in parts)


@pytest.mark.parametrize("lie", sorted(EVAL_LIES))
def test_lying_evaluator_is_rejected_paid_nothing_and_not_published(network, corpus,
                                                                     lie: str) -> None:
    net = network(["honest", lie], rounds=2, verify="spot_check_rate = 0\neval_quorum_rate = 0")
    honest, liar = net.nodes
    net.run()
    led = net.ledger
    evals = [(u, lease) for u, lease in led.updates_with_leases() if lease.kind == "eval"]
    mine = [u for u, lease in evals if lease.node_id == liar.id]
    assert len(mine) == 3 and all(u.reason == Reason.EVAL_MISMATCH for u in mine)
    assert all("windows off" in u.detail for u in mine)
    assert all(u.verdict == "accepted" for u, lease in evals if lease.node_id == honest.id)
    # no credit for a lie, and the penalty of a lost check for each
    liar_eval_credit = [c for c in led.credits(node_id=liar.id)
                        if c.update_id in {u.id for u in mine}]
    assert liar_eval_credit and all(c.amount < 0 for c in liar_eval_credit)
    assert all(c.components_dict()["reason"] == Reason.EVAL_MISMATCH
               for c in liar_eval_credit)
    assert_credit_only_for_accepted(led)
    # published losses: only the honest replies and the coordinator's own windows
    for v in led.versions():
        sources = led.version_evals(v.version)
        assert sources and all(u.verdict == "accepted" and u.node_id == honest.id
                               for u in sources)
        assert v.val_local_tokens and v.val_windows_recomputed >= 4
        assert v.val_loss == pytest.approx(_true_val_loss(net, corpus, v.version), rel=1e-4)
    # a lost eval check counts for probation and trust like a lost spot check
    assert liar.id in led.lost_spot_check_within(5)
    trust = {s.node_id: s.trust for s in led.node_summaries()}
    assert trust[liar.id] < 0.2 < trust[honest.id]
    assert any(e.kind == "reject" and e.node_id == liar.id and "eval_mismatch" in e.message
               for e in led.events())


def test_undefended_lie_would_have_moved_the_published_loss(network, corpus) -> None:
    # the control: with nothing recomputed and no quorum the flat lie goes through
    net = network(["honest", "eval_lie"], rounds=1,
                  verify="spot_check_rate = 0\neval_quorum_rate = 0\neval_check_windows = 0")
    net.run()
    v0 = net.ledger.versions()[0]
    assert v0.val_loss < 0.8 * _true_val_loss(net, corpus, 0)


@pytest.mark.parametrize("behaviour", ["honest", "bf16"])
def test_honest_fp32_and_bf16_evaluators_are_accepted(network, behaviour: str) -> None:
    net = network([behaviour, behaviour], rounds=1,
                  verify="spot_check_rate = 0\neval_quorum_rate = 1\neval_check_windows = 4")
    for n in net.nodes:
        n.on = frozenset({"train", "eval"})  # bf16 in eval work too
    net.run()
    evals = [u for u, lease in net.ledger.updates_with_leases() if lease.kind == "eval"]
    assert len(evals) > 2 and all(u.verdict == "accepted" for u in evals), evals
    assert any("quorum with" in u.detail and "agree" in u.detail for u in evals)
    assert all("windows recomputed" in u.detail for u in evals)


def test_quorum_alone_catches_the_liar(tmp_path, corpus, nets) -> None:
    # sampling off: only the quorum with a node of another institution can catch the lie
    net = make_net(tmp_path, corpus, [], rounds=1, nodes=[],
                   verify="spot_check_rate = 0\neval_quorum_rate = 1\neval_check_windows = 0")
    nets.append(net)
    honest = enroll(net.ledger, ["honest"], institution="University A")
    liar = enroll(net.ledger, ["eval_subtle"], institution="University B", first=1)
    net.nodes.extend(honest + liar)
    net.run()
    led = net.ledger
    evals = [(u, lease) for u, lease in led.updates_with_leases() if lease.kind == "eval"]
    lied = [u for u, lease in evals if lease.node_id == liar[0].id]
    assert lied and all(u.reason == Reason.EVAL_MISMATCH and "quorum with" in u.detail
                        for u in lied)
    assert all(u.verdict == "accepted" for u, lease in evals if lease.node_id == honest[0].id)
    assert any(e.kind == "quorum" and "disagree" in e.message for e in led.events())
    for v in led.versions():
        assert v.val_loss == pytest.approx(_true_val_loss(net, corpus, v.version), rel=1e-4)

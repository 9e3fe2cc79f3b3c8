"""The inner loop data-parallel over 2 gloo CPU processes against ``train_inner`` in one."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
import torch

from test_training_inner import CFG, base, tokens  # noqa: F401  (fixtures)

from training.data_parallel import (
    DataParallelError, InnerPool, check_world_batch, train_inner_parallel,
)
from training.inner import train_inner

KW = dict(steps=4, batch_size=4, seq_len=16, lr=3e-3, weight_decay=0.1)


@pytest.fixture(scope="module")
def pool():
    # a hang would last the process group's timeout (60 s); a clear error comes in seconds
    # (~3 s here, over 10 s on a loaded machine): the bound tells the two apart
    with InnerPool(2, "cpu", threads=1, timeout_s=60) as p:
        yield p


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _assert_same(got, want) -> None:
    assert got.pseudo_grad.keys() == want.pseudo_grad.keys()
    for k, w in want.pseudo_grad.items():
        np.testing.assert_allclose(got.pseudo_grad[k], w, rtol=1e-4, atol=1e-5, err_msg=k)
    assert got.loss_before == pytest.approx(want.loss_before, rel=1e-5)
    assert got.loss_after == pytest.approx(want.loss_after, rel=1e-5)
    assert (got.tokens, got.steps) == (want.tokens, want.steps)


def test_two_ranks_match_one_process_lease_after_lease(pool, base, tokens):
    pids = pool.pids
    for seed in (7, 8):  # the same processes serve every lease
        got = pool.run(base, CFG, tokens, seed=seed, **KW)
        with _one_thread():
            want = train_inner(base, CFG, tokens, seed=seed, device="cpu", **KW)
        _assert_same(got, want)
        assert np.abs(want.pseudo_grad["transformer.wte.weight"]).max() > 1e-4  # it trained
    assert pool.pids == pids and pool.alive


def test_progress_runs_in_the_caller_and_raising_stops_the_lease(pool, base, tokens):
    calls: list[tuple[int, int, int]] = []
    pool.run(base, CFG, tokens, seed=1, progress=lambda *a: calls.append(a), **KW)
    assert calls == [(s, 4, s * 4 * 16) for s in range(1, 5)]

    class Stop(Exception):
        pass

    def stop_at_2(step: int, steps: int, done: int) -> None:
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        pool.run(base, CFG, tokens, seed=1, progress=stop_at_2, **dict(KW, steps=30))
    # every rank stopped at the same step: the next lease runs as usual
    got = pool.run(base, CFG, tokens, seed=7, **KW)
    with _one_thread():
        _assert_same(got, train_inner(base, CFG, tokens, seed=7, device="cpu", **KW))


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(pool, base, tokens):
    with pytest.raises(ValueError, match="batch_size 3 does not split over 2 GPUs"):
        pool.run(base, CFG, tokens, seed=1, **dict(KW, batch_size=3))
    with pytest.raises(ValueError, match="multiple of 4"):  # before any process starts
        train_inner_parallel(4, base, CFG, tokens, device="cpu", seed=1, **dict(KW,
                                                                               batch_size=6))
    check_world_batch(8, 4)


def test_a_rank_killed_mid_lease_is_one_clear_error_not_a_hang(base, tokens):
    # a hang would last the process group's timeout (60 s); a clear error comes in seconds
    # (~3 s here, over 10 s on a loaded machine): the bound tells the two apart
    with InnerPool(2, "cpu", threads=1, timeout_s=60) as p:
        victim = p.pids[1]

        def kill_rank_1(step: int, steps: int, done: int) -> None:
            if step == 1:
                os.kill(victim, signal.SIGKILL)

        t0 = time.monotonic()
        with pytest.raises(DataParallelError, match="rank 1: killed by SIGKILL"):
            p.run(base, CFG, tokens, seed=1, progress=kill_rank_1, **dict(KW, steps=500))
        assert time.monotonic() - t0 < 30
        assert not p.alive and p.pids == []  # every rank reaped
        got = p.run(base, CFG, tokens, seed=7, **KW)  # the next lease: fresh processes
        assert victim not in p.pids and p.alive
    with _one_thread():
        _assert_same(got, train_inner(base, CFG, tokens, seed=7, device="cpu", **KW))


def test_the_worker_trains_a_lease_on_its_pool(pool, base, tokens):
    from types import SimpleNamespace

    from node.worker import WorkerSettings, _train

    lease = SimpleNamespace(inner_steps=4, batch_size=4, seq_len=16, lr=3e-3, weight_decay=0.1,
                            seed=7)
    settings = WorkerSettings(node_id=1, key=None, gpus=2, pool=pool)
    got = _train(base, CFG, tokens, lease, settings, torch.device("cpu"), None)
    with _one_thread():
        _assert_same(got, train_inner(base, CFG, tokens, seed=7, device="cpu", **KW))


@pytest.mark.parametrize("gpus, device, available, want", [
    ("1", "cpu", 0, 1), ("all", "auto", 0, 1), ("all", "auto", 4, 4), ("2", "cuda", 4, 2),
    ("all", "cpu", 1, 1),
])
def test_join_gpus_resolves_to_a_process_count(gpus, device, available, want):
    from node.gpu import gpu_count

    assert gpu_count(gpus, device, available) == want


@pytest.mark.parametrize("gpus, device, available, why", [
    ("2", "auto", 0, "no CUDA GPU"), ("8", "auto", 4, r"only 4 GPU\(s\) available"),
    ("0", "auto", 4, "expected a count >= 1 or 'all'"), ("x", "auto", 4, "expected a count"),
    ("2", "cpu", 4, "not 'cpu'"), ("2", "cuda:1", 4, "not 'cuda:1'"),
])
def test_join_gpus_refuses_what_the_machine_cannot_do(gpus, device, available, why):
    from node.gpu import gpu_count
    from protocol.errors import ConfigError

    with pytest.raises(ConfigError, match=why):
        gpu_count(gpus, device, available)

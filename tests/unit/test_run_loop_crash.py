"""The coordinator survives ``kill -9`` at any point (``chaos``): killed at a random ledger
write and started again, it loses no accepted update, credit or receipt, doubles nothing,
skips no round, leaves no lease open, and keeps the model and its optimizer state in step
with the ledger. ``ATOM_CHAOS_TRIALS`` sets how many crash points (``bench/chaos.py`` runs
many more)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from chaos import ASYNC, SPECS, VERIFY, count_writes, crash_at_write, crash_points, trial, violations

from fake_network import FakeTransport
from loop_world import build_test_corpus, make_net

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.run.loop import RunLoop
from coordinator.run.resume import run_resuming
from coordinator.run.model_store import ModelStore
from protocol.blobstore import BlobDir
from protocol.errors import LedgerError
from protocol.signing import generate_key
from training.corpus import CorpusInfo

ROUNDS = 2
TRIALS = int(os.environ.get("ATOM_CHAOS_TRIALS", "6"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_test_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def writes(tmp_path_factory: pytest.TempPathFactory, corpus: CorpusInfo) -> int:
    torch.set_num_threads(1)
    return count_writes(tmp_path_factory.mktemp("count"), corpus, ROUNDS)


def test_an_uninterrupted_run_breaks_no_invariant(tmp_path: Path, corpus: CorpusInfo) -> None:
    # the invariants themselves hold on a run nobody killed (else every trial would fail)
    assert trial(tmp_path, corpus, ROUNDS, n=10**9) == []


@pytest.mark.parametrize("i", range(TRIALS))
def test_killed_anywhere_and_restarted_loses_nothing(tmp_path: Path, corpus: CorpusInfo,
                                                     writes: int, i: int) -> None:
    n = crash_points(writes, TRIALS, seed=2026)[i]
    assert trial(tmp_path, corpus, ROUNDS, n) == [], f"killed at write {n} of {writes}"


@pytest.fixture(scope="module")
def async_writes(tmp_path_factory: pytest.TempPathFactory, corpus: CorpusInfo) -> int:
    torch.set_num_threads(1)
    return count_writes(tmp_path_factory.mktemp("count-async"), corpus, ROUNDS + 1, ASYNC)


def test_an_uninterrupted_async_run_breaks_no_invariant(tmp_path: Path,
                                                        corpus: CorpusInfo) -> None:
    assert trial(tmp_path, corpus, ROUNDS + 1, n=10**9, extra=ASYNC) == []


@pytest.mark.parametrize("i", range(TRIALS))
def test_the_async_loop_killed_anywhere_and_restarted_loses_nothing(
        tmp_path: Path, corpus: CorpusInfo, async_writes: int, i: int) -> None:
    # mid-buffer, mid-step, between a spot check's two results, mid-evaluation
    n = crash_points(async_writes, TRIALS, seed=2027)[i]
    assert trial(tmp_path, corpus, ROUNDS + 1, n, extra=ASYNC) == [], \
        f"killed at write {n} of {async_writes}"


@pytest.mark.parametrize("at", [0.3, 0.7])
def test_a_ledger_outage_under_a_live_coordinator_is_ridden_out(
        tmp_path: Path, corpus: CorpusInfo, writes: int, at: float) -> None:
    # the database fails one write (a PostgreSQL restart, say): the open transaction rolls
    # back, and run_resuming rebuilds the loop from the ledger after a pause, as a restart
    key = generate_key()
    net = make_net(tmp_path, corpus, SPECS, rounds=ROUNDS, verify=VERIFY, seed=3,
                   issuer=ReceiptIssuer(key))
    loops: list[RunLoop] = []

    def make() -> RunLoop:
        loop = RunLoop(net.cfg, net.ledger, FakeTransport(net.nodes, net.clock,
                                                          BlobDir(tmp_path / "blobs")),
                       ModelStore.open(tmp_path / "checkpoints", net.cfg, net.ledger,
                                       corpus=corpus), corpus,
                       clock=net.clock, sleep=net.clock.sleep, issuer=ReceiptIssuer(key),
                       blobs=BlobDir(tmp_path / "blobs"))
        loops.append(loop)
        return loop

    paused: list[float] = []
    with crash_at_write(net.ledger, int(writes * at), LedgerError):
        run_resuming(make, delays=(5.0, 10.0), sleep=paused.append)
    assert paused == [5.0] and len(loops) == 2
    assert violations(net.ledger, loops[-1].store, ROUNDS, key) == []
    net.ledger.close()


def test_a_ledger_that_stays_down_ends_the_run(tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, SPECS, rounds=ROUNDS)
    calls: list[int] = []

    def make() -> RunLoop:
        calls.append(1)
        raise LedgerError("ledger sqlite:///x failed: database is locked")

    with pytest.raises(LedgerError, match="database is locked"):
        run_resuming(make, delays=(1.0, 2.0), sleep=lambda s: None)
    assert len(calls) == 3
    net.ledger.close()


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
from chaos import count_writes, crash_points, trial

from training.corpus import CorpusInfo
from loop_world import build_test_corpus

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

"""Task scores in the ledger (``atom-coordinator eval-tasks``): recorded per version, a task
measured again replaces its rows, non-finite numbers are NULL, and ledgers made before the
table existed still open: read-only they have no scores, for writing they gain the table."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import create_engine
from sqlmodel import SQLModel

from coordinator.ledger import Ledger
from coordinator.ledger.models import TABLES
from protocol.errors import LedgerError

HARNESS = "lm-eval 0.4.13"


def score(task: str, metric: str, value: float | None, *, filter: str = "none",
          stderr: float | None = 0.1, n: int = 8, digest: str = "d" * 64) -> dict:
    return {"task": task, "metric": metric, "filter": filter, "value": value,
            "stderr": stderr, "n_samples": n, "task_digest": digest}


def add_versions(ledger: Ledger, n: int = 2) -> None:
    for v in range(n):
        ledger.add_model_version(v, f"{v:064x}", f"/ckpt/{v}", v, n_updates=0, tokens=0)


def as_tuples(ledger: Ledger, version: int | None = None) -> list[tuple]:
    return [(r.version, r.task, r.metric, r.filter, r.value, r.stderr, r.n_samples)
            for r in ledger.task_scores(version)]


def test_scores_are_recorded_per_version(ledger: Ledger) -> None:
    add_versions(ledger)
    ledger.record_task_scores(1, [score("mc", "acc", 0.5), score("mc", "acc_norm", 0.25),
                                  score("ppl", "bits_per_byte", 3.5, stderr=None, n=4)],
                              harness=HARNESS, at=7.0)
    ledger.record_task_scores(0, [score("mc", "acc", 0.125)], harness=HARNESS)
    assert as_tuples(ledger, 1) == [(1, "mc", "acc", "none", 0.5, 0.1, 8),
                                    (1, "mc", "acc_norm", "none", 0.25, 0.1, 8),
                                    (1, "ppl", "bits_per_byte", "none", 3.5, None, 4)]
    assert as_tuples(ledger, 0) == [(0, "mc", "acc", "none", 0.125, 0.1, 8)]
    assert [r.version for r in ledger.task_scores()] == [0, 1, 1, 1]
    row = ledger.task_scores(1)[0]
    assert (row.harness, row.task_digest, row.created_at) == (HARNESS, "d" * 64, 7.0)


def test_measuring_a_task_again_replaces_only_its_rows(ledger: Ledger) -> None:
    add_versions(ledger)
    ledger.record_task_scores(1, [score("mc", "acc", 0.5), score("mc", "acc_norm", 0.25),
                                  score("ppl", "word_perplexity", 9.0)], harness=HARNESS)
    ledger.record_task_scores(1, [score("mc", "acc", 0.75, digest="e" * 64)], harness=HARNESS)
    assert [(r.task, r.metric, r.value, r.task_digest[0]) for r in ledger.task_scores(1)] == [
        ("mc", "acc", 0.75, "e"), ("ppl", "word_perplexity", 9.0, "d")]


def test_non_finite_numbers_are_stored_as_null(ledger: Ledger) -> None:
    add_versions(ledger)
    ledger.record_task_scores(0, [score("ppl", "word_perplexity", math.inf, stderr=math.nan)],
                              harness=HARNESS)
    [row] = ledger.task_scores(0)
    assert (row.value, row.stderr) == (None, None)


def test_a_version_the_ledger_does_not_have_is_refused(ledger: Ledger) -> None:
    add_versions(ledger, 1)
    with pytest.raises(LedgerError, match="no model version 5 in the ledger"):
        ledger.record_task_scores(5, [score("mc", "acc", 0.5)], harness=HARNESS)
    assert ledger.task_scores() == []


def test_one_metric_twice_in_one_measurement_is_refused_whole(ledger: Ledger) -> None:
    add_versions(ledger, 1)
    with pytest.raises(LedgerError, match="refused"):
        ledger.record_task_scores(0, [score("mc", "acc", 0.5), score("mc", "acc", 0.6)],
                                  harness=HARNESS)
    assert ledger.task_scores() == []


def test_a_read_only_ledger_reads_scores_and_refuses_them(open_ledger) -> None:
    writer = open_ledger()
    add_versions(writer, 1)
    writer.record_task_scores(0, [score("mc", "acc", 0.5)], harness=HARNESS)
    reader = open_ledger(read_only=True)
    assert as_tuples(reader) == [(0, "mc", "acc", "none", 0.5, 0.1, 8)]
    with pytest.raises(LedgerError, match="read-only"):
        reader.record_task_scores(0, [score("mc", "acc", 0.1)], harness=HARNESS)


def test_a_ledger_made_before_task_scores_opens(ledger_url: str, open_ledger) -> None:
    engine = create_engine(ledger_url)
    try:
        SQLModel.metadata.create_all(engine, tables=[t for t in TABLES
                                                     if t.name != "task_scores"])
    finally:
        engine.dispose()
    assert open_ledger(read_only=True).task_scores() == []  # as an export reads it
    writer = open_ledger()  # opened for writing: it gains the table
    add_versions(writer, 1)
    writer.record_task_scores(0, [score("mc", "acc", 0.5)], harness=HARNESS)
    assert as_tuples(open_ledger(read_only=True)) == [(0, "mc", "acc", "none", 0.5, 0.1, 8)]

"""``atom-coordinator export``: the leaderboard per institution and per node, against the ledger."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.accounting.leaderboard import CSV_COLUMNS, leaderboard
from coordinator.cli import app as coordinator_app
from coordinator.ledger import Ledger, NodeSummary
from coordinator.rundir import RunDir, init_run

# (institution, node, [(kind, tokens, verdict, credit)])
WORK = [
    ("Uni A", "alice", [("train", 2000, "accepted", 2.0), ("eval", 100, "accepted", 0.01),
                        ("train", 999, "rejected", None)]),
    ("Uni B", "bob", [("train", 1000, "accepted", 1.0)]),
    ("Uni A", "carol", [("train", 1000, "accepted", 1.0)]),
    ("Uni C", "dave", [("train", 500, "rejected", None)]),
]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[tuple[RunDir, Ledger]]:
    rd = init_run(tmp_path / "run", run_id="board-test")
    ledger = rd.ledger()
    n = 0
    for inst_name, name, work in WORK:
        inst = ledger.add_institution(inst_name)
        node = ledger.add_node(100 + n, name, inst.id, "pem", f"{n:016x}")
        for kind, tokens, verdict, credit in work:
            n += 1
            lease = ledger.record_lease(run_id="board-test", round=1, shard_id=n, kind=kind,
                                        node_id=node.id, base_version=0, nonce=f"{n:032x}",
                                        data_start=0, data_end=tokens, deadline=2e9)
            upd = ledger.record_update(lease_id=lease.id, node_id=node.id,
                                       arrays_digest="ab" * 32, verdict=verdict,
                                       tokens=tokens, steps=1, loss_before=1.0, loss_after=1.0,
                                       wall_s=1.0)
            if credit is not None:
                ledger.add_credit(node.id, upd.id, credit, {"kind": kind, "tokens": tokens})
    try:
        yield rd, ledger
    finally:
        ledger.close()


def export(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(coordinator_app, ["export", *map(str, args)],
                              catch_exceptions=False)


def _expected_nodes(summaries: list[NodeSummary]) -> dict[str, dict]:
    return {s.name: {"node_id": s.node_id, "institution": s.institution,
                     "accepted_updates": s.accepted, "tokens_trained": s.tokens,
                     "tokens_evaluated": s.eval_tokens, "credits": pytest.approx(s.credits)}
            for s in summaries}


def test_json_matches_the_ledger(run) -> None:
    rd, ledger = run
    result = export(rd.path, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "atom-leaderboard-v1" and doc["run_id"] == "board-test"
    assert doc["generated_at"].endswith("Z")
    nodes = {row["node"]: row for row in doc["nodes"]}
    for name, want in _expected_nodes(ledger.node_summaries()).items():
        assert {k: nodes[name][k] for k in want} == want
    # ties share a rank: bob and carol earned the same
    assert [(r["node"], r["rank"]) for r in doc["nodes"]] == [
        ("alice", 1), ("bob", 2), ("carol", 2), ("dave", 4)]
    assert doc["institutions"] == [
        {"rank": 1, "institution": "Uni A", "nodes": 2, "accepted_updates": 3,
         "tokens_trained": 3000, "tokens_evaluated": 100, "credits": 3.01},
        {"rank": 2, "institution": "Uni B", "nodes": 1, "accepted_updates": 1,
         "tokens_trained": 1000, "tokens_evaluated": 0, "credits": 1.0},
        {"rank": 3, "institution": "Uni C", "nodes": 1, "accepted_updates": 0,
         "tokens_trained": 0, "tokens_evaluated": 0, "credits": 0.0}]


def test_csv_to_a_file_matches_the_ledger(run, tmp_path: Path) -> None:
    rd, ledger = run
    out = tmp_path / "pub" / "board.csv"
    result = export(rd.path, "--format", "csv", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    text = out.read_text()
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(text)))
    scopes = [r["scope"] for r in rows]
    assert scopes == ["institution"] * 3 + ["node"] * 4
    inst = {r["institution"]: r for r in rows if r["scope"] == "institution"}
    assert inst["Uni A"] == {"scope": "institution", "rank": "1", "institution": "Uni A",
                             "node_id": "", "node": "", "nodes": "2", "accepted_updates": "3",
                             "tokens_trained": "3000", "tokens_evaluated": "100",
                             "credits": "3.01"}
    nodes = {r["node"]: r for r in rows if r["scope"] == "node"}
    for name, want in _expected_nodes(ledger.node_summaries()).items():
        got = nodes[name]
        assert got["nodes"] == ""
        assert (int(got["node_id"]), got["institution"], int(got["accepted_updates"]),
                int(got["tokens_trained"]), int(got["tokens_evaluated"]), float(got["credits"])
                ) == (want["node_id"], want["institution"], want["accepted_updates"],
                      want["tokens_trained"], want["tokens_evaluated"], want["credits"])


def test_export_reads_only(run, tmp_path: Path) -> None:
    rd, ledger = run
    ledger.close()
    db = rd.path / "ledger.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert export(rd.path, "--format", "csv").exit_code == 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    db.unlink()
    result = export(rd.path)
    assert result.exit_code == 7 and result.stderr.startswith("error: cannot open ledger")
    assert not db.exists()  # read-only: never creates a ledger


def test_ranks_without_anyone() -> None:
    board = leaderboard([], "r", 0.0)
    assert board.nodes == [] and board.institutions == []
    assert board.to_csv() == ",".join(CSV_COLUMNS) + "\n"
    assert json.loads(board.to_json())["generated_at"] == "1970-01-01T00:00:00Z"

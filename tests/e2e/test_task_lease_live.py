"""A tasks lease with real Flower processes: the last version's lm-eval tasks go to a node as an
evaluate message, its warm worker fetches the bundle and the tokenizer by digest and answers,
and the coordinator records the scores its answers make."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from rich.console import Console

from coordinator.demo import run_demo
from coordinator.ledger import Ledger
from coordinator.rundir import RunDir
from training.corpus import load_corpus
from training.evals.bundle import pack_tasks
from training.evals.tasks import load_tasks

pytest.importorskip("lm_eval", reason="the evals extra: pip install -e '.[evals]'")

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "tasks"


def test_a_node_answers_the_last_versions_tasks_and_the_scores_are_recorded(
        workdir: Path) -> None:
    summary, status = run_demo(nodes=1, rounds=1, workdir=workdir, console=QUIET,
                               overrides={"train_inner_steps": 40, "eval_tasks": str(EXAMPLE)})
    assert status == "finished:completed", summary
    with Ledger(summary["ledger"]) as ledger:
        (lease,) = [x for x in ledger.leases() if x.kind == "tasks"]
        assert lease.base_version == 1 and lease.status == "answered"
        (update,) = [u for u in ledger.updates() if u.lease_id == lease.id]
        assert update.verdict == "accepted", update.detail
        scores = ledger.task_scores(1)
        assert {s.task for s in scores} == {"atom_python_mc", "atom_python_ppl"}
        assert all("answers of node-a" in s.harness for s in scores)
        assert any(c.update_id == update.id and c.amount > 0 for c in ledger.credits())
    # the bundle and the tokenizer came by digest, fetched ahead while the node evaluated
    bundle = hashlib.sha256(pack_tasks(load_tasks(EXAMPLE))).hexdigest()
    cache = workdir / "nodes" / "0" / "blobs"
    assert (cache / bundle[:2] / bundle).is_file()
    tokenizer = load_corpus(RunDir(workdir).corpus).tokenizer_digest
    assert (cache / tokenizer[:2] / tokenizer).is_file()

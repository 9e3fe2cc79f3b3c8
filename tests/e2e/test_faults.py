"""Faults with real Flower processes: a node killed mid-shard, a node signing with a wrong key."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from rich.console import Console

from coordinator.demo import run_demo

from .conftest import processes_mentioning
from coordinator.ledger import Ledger
from protocol.signing import generate_key, save_private_key

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115


def test_node_killed_mid_round(workdir: Path) -> None:
    killed: dict[str, int] = {}

    def kill_first_trainer(procs: list[subprocess.Popen[bytes]], ledger: Ledger) -> None:
        if killed:
            return
        train = [lease for lease in ledger.open_leases() if lease.kind == "train"]
        if train:
            victim = min(train, key=lambda lease: lease.node_id)
            index = {n.id: ord(n.name[-1]) - ord("a") for n in ledger.nodes()}[victim.node_id]
            # the machine vanishes: its supervisor, SuperNode and ClientApp, all at once
            for pid in processes_mentioning(str(workdir / "nodes" / str(index))):
                os.kill(pid, signal.SIGKILL)
            killed.update(node_id=victim.node_id, lease_id=victim.id, shard=victim.shard_id,
                          round=victim.round)

    # no spot checks: the killed lease's shard must have no second result
    summary, status = run_demo(nodes=2, rounds=2, workdir=workdir, console=QUIET,
                               overrides={"train_deadline_s": 45.0,
                                          "verify_spot_check_rate": 0.0},
                               on_tick=kill_first_trainer)
    assert status == "finished:completed", summary
    assert killed, "no train lease was ever seen open"
    with Ledger(summary["ledger"]) as ledger:
        dead = ledger.lease(killed["lease_id"])
        assert dead.status in ("expired", "failed")
        assert not [u for u in ledger.updates() if u.lease_id == dead.id]
        assert not ledger.credits(node_id=killed["node_id"]) or all(
            ledger.lease(u.lease_id).round < killed["round"]
            for u in ledger.updates(node_id=killed["node_id"]))
        # the round still produced a version from the survivor
        versions = ledger.versions()
        assert versions[killed["round"]].n_updates == 1
        # the dead lease's shard went back to the pool and was trained later by someone else
        later = [lease for lease in ledger.leases(status="answered")
                 if lease.kind == "train" and lease.shard_id == killed["shard"]
                 and lease.round > killed["round"]]
        assert later and later[0].node_id != killed["node_id"]
        kinds = {e.kind for e in ledger.events()}
        assert "reissue" in kinds
    assert summary["val_loss"][-1] < summary["val_loss"][0]


def test_wrong_key_is_rejected_and_run_continues(workdir: Path, tmp_path: Path) -> None:
    other = tmp_path / "mallory.key"
    save_private_key(generate_key(), other)
    summary, status = run_demo(nodes=2, rounds=1, workdir=workdir, console=QUIET,
                               node_args={1: ["--sign-key", str(other)]})
    assert status == "finished:completed", summary
    with Ledger(summary["ledger"]) as ledger:
        mallory = next(n for n in ledger.nodes() if n.name == "node-b")
        honest = next(n for n in ledger.nodes() if n.name == "node-a")
        bad = ledger.updates(node_id=mallory.id)
        assert bad and all(u.verdict == "rejected" and u.reason == "bad_signature" for u in bad)
        assert ledger.credits(node_id=mallory.id) == []
        assert any(e.kind == "reject" and e.node_id == mallory.id for e in ledger.events())
        good = [u for u in ledger.updates(node_id=honest.id) if u.verdict == "accepted"]
        assert good and ledger.credits(node_id=honest.id)
        v1 = ledger.versions()[1]
        assert v1.n_updates == 1 and v1.val_loss is not None

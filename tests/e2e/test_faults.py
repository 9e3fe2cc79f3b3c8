"""Faults with real Flower processes: a node killed mid-shard, a node signing with a wrong key,
a node's warm worker killed mid-lease."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from rich.console import Console

from coordinator.demo import run_demo

from .conftest import processes_mentioning
from coordinator.ledger import Ledger
from protocol.signing import generate_key, save_private_key

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115
# a quarter of the demo's work per lease: these tests are about faults, not about learning
SHORT = {"train_inner_steps": 60}


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
                               overrides={"train_deadline_s": 25.0, **SHORT,
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
                               overrides=SHORT, node_args={1: ["--sign-key", str(other)]})
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


def test_a_crashed_worker_costs_only_its_lease(workdir: Path) -> None:
    """kill -9 a node's warm worker mid-lease: the supervisor starts a new one beside the same
    SuperNode, Flower answers the lost lease with an error once its claim lapses, the shard
    goes to another node, and the run completes."""
    killed: dict[str, int] = {}

    def kill_worker_mid_train(procs: list[subprocess.Popen[bytes]], ledger: Ledger) -> None:
        if killed:
            return
        node_a = next((n for n in ledger.nodes() if n.name == "node-a"), None)
        train = [lease for lease in ledger.open_leases()
                 if lease.kind == "train" and node_a is not None and lease.node_id == node_a.id]
        progress = workdir / "nodes" / "0" / "progress.json"
        if not train or not progress.exists() or '"train"' not in progress.read_text():
            return
        workers = _worker_pids(workdir / "nodes" / "0")
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            killed.update(pid=workers[0], lease_id=train[0].id, shard=train[0].shard_id,
                          node_id=train[0].node_id)

    summary, status = run_demo(nodes=2, rounds=2, workdir=workdir, console=QUIET,
                               overrides={"verify_spot_check_rate": 0.0, **SHORT},
                               on_tick=kill_worker_mid_train)
    assert status == "finished:completed", summary
    assert killed, "node-a's worker was never seen training"
    log = (workdir / "nodes" / "0" / "logs" / "worker.log").read_text()
    pids = set(re.findall(r"warm worker pid (\d+)", log))
    assert str(killed["pid"]) in pids and len(pids) >= 2  # restarted beside its SuperNode
    with Ledger(summary["ledger"]) as ledger:
        lost = ledger.lease(killed["lease_id"])
        assert lost.status in ("failed", "expired")
        assert not [u for u in ledger.updates() if u.lease_id == lost.id]
        assert any(e.kind == "reissue" and e.node_id == killed["node_id"]
                   for e in ledger.events())
        redone = [lease for lease in ledger.leases(status="answered")
                  if lease.kind == "train" and lease.shard_id == killed["shard"]]
        assert redone and all(lease.node_id != killed["node_id"] for lease in redone)
        assert [v.version for v in ledger.versions()] == [0, 1, 2]
        # what node-a had been paid for before the crash stands
        assert all(ledger.lease(u.lease_id).id != lost.id
                   for u in ledger.updates(node_id=killed["node_id"]))


def _worker_pids(home: Path) -> list[int]:
    """The warm worker of the node whose home is ``home``: the one on the Runtime API port
    that node's SuperNode was started with."""
    out = []
    for pid in processes_mentioning(str(home)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--isolation" in cmd and "--port" in cmd:
            port = cmd[cmd.index("--port") + 1]
            out += processes_mentioning(f"--runtime-api 127.0.0.1:{port}")
    return out

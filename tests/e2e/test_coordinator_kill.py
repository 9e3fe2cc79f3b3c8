"""``kill -9`` of a real coordinator mid-run: nothing of it lives on, and a plain restart
finishes the run with the same nodes (nobody touches them) and loses nothing accepted. And
``kill -9`` of its SuperLink alone: the coordinator restarts it and finishes by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.demo import node_command
from coordinator.ledger import Ledger
from coordinator.rundir import create_invite, init_run
from protocol.processes import (
    _descendants, alive, flower_env, free_port, process_token, spawn, stop,
)

ROUNDS = 3


def _until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _start(wd: Path, log: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "coordinator", "start", str(wd)]
    return spawn(cmd, env=flower_env(wd / "coordinator-flwr"), log=wd / log)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("victim", ["coordinator", "superlink"])
def test_killed_mid_round_the_run_resumes_and_loses_nothing(workdir: Path, victim: str) -> None:
    fleet = free_port()
    while (port := free_port()) == fleet:
        pass
    rd = init_run(workdir, force=True, run_rounds=ROUNDS, run_min_nodes=2,
                  run_wait_for_nodes_s=120.0, network_fleet_port=fleet,
                  network_coordinator_port=port, train_inner_steps=40,
                  network_metrics_address=f"127.0.0.1:{free_port()}",
                  train_deadline_s=60.0, data_eval_tokens=4096, verify_spot_check_rate=0.0)
    coord = _start(workdir, "coordinator-1.log")
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        ledger = Ledger(rd.config().ledger_url(rd.path))
        for i in range(2):
            _until(lambda: (rd.path / "superlink.json").exists(), 60, "the coordinator")
            token = create_invite(rd, f"University {'AB'[i]}")
            nodes.append(spawn(node_command(rd, token, f"node-{'ab'[i]}", workdir / "n" / str(i),
                                            1, []),
                               env=flower_env(workdir / "n" / f"flwr-{i}"),
                               log=workdir / f"node-{i}.log"))
        # kill it while round 2's training is out: a version made, the next leases open
        _until(lambda: len(ledger.versions()) >= 2 and any(
            x.kind == "train" and x.round == 2 for x in ledger.open_leases()), 300,
            "round 2 under way")
        family = _descendants(coord.pid)
        assert family, "the coordinator runs its SuperLink and ServerApp as children"
        if victim == "superlink":
            [link] = [p for p in family if "flower-superlink" in _cmdline(p)]
            os.kill(link, signal.SIGKILL)
            # the coordinator restarts its services by itself and finishes the run
            assert coord.wait(timeout=600) == 0, \
                (workdir / "coordinator-1.log").read_text()[-2000:]
            assert "restarting the coordinator's services" in \
                (workdir / "coordinator-1.log").read_text()
            _check(ledger)
            ledger.close()
            return
        tokens = [process_token(pid) for pid in family]  # before the kill: pids get reused
        os.kill(coord.pid, signal.SIGKILL)
        coord.wait()
        # the ServerApp watches for its coordinator (measured: all gone 1.5 s after the kill;
        # 6 s without the watch, when it notices its SuperLink is gone, and minutes when it
        # is busy judging). 4 s once ran out in CI beside the other xdist worker; 5.5 s still
        # fails a missing watch
        _until(lambda: not any(map(alive, tokens)), 5.5,
               "the killed coordinator's processes to exit")

        coord = _start(workdir, "coordinator-2.log")
        assert coord.wait(timeout=600) == 0, (workdir / "coordinator-2.log").read_text()[-2000:]

        _check(ledger)
        ledger.close()
    finally:
        stop(coord)
        for p in nodes:
            stop(p)


def _check(ledger: Ledger) -> None:
    versions = ledger.versions()
    assert [v.version for v in versions] == list(range(ROUNDS + 1))
    assert all(v.val_loss is not None for v in versions)
    assert not ledger.open_leases()
    train_rounds = sorted({x.round for x in ledger.leases() if x.kind == "train"})
    assert train_rounds == list(range(1, ROUNDS + 1))
    credits = {}
    for c in ledger.credits():
        credits.setdefault(c.update_id, []).append(c.amount)
    for u in ledger.updates():
        if u.verdict == "accepted":
            assert len(credits.get(u.id, [])) == 1, u
    assert len(ledger.receipts()) == len(ledger.credits())
    assert any("resumed" in e.message for e in ledger.events())

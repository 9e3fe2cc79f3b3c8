"""Handing a lease back: the worker's gate between training steps (``node.pause`` in
``node.worker.do_work``), the warm worker's signals, and the supervisor's leave on SIGTERM /
SIGUSR1 — the worker told, the SuperNode stopped only after the reply went out, exit 0 —
with small scripts standing in for Flower's processes."""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from node import supervisor
from node.identity import Enrollment, NodeHome
from node.limits import NodeLimits
from node.pause import LEAVING_RETRY_S, LeaseGate
from node.policy import Policy
from node.supervisor import Supervisor, messages_in_flight
from node.warm_worker import leave_on_signals
from node.worker import WorkerSettings, do_work
from protocol.blobstore import BlobDir
from protocol.digest import arrays_to_bytes
from protocol.messages import Lease, parse_handback, parse_reply, work_content
from protocol.processes import stop
from protocol.signing import generate_key
from training.model import GPTConfig
from training.state import init_arrays

ROOT = Path(__file__).resolve().parents[2]
CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
STEPS = 5
NONCE = "ab" * 16


# -- the worker: the gate between steps ------------------------------------------------------

def work(blobs: BlobDir) -> object:
    tokens = (np.arange(256) % 256).astype("<u2")
    lease = Lease(run_id="r", round=1, shard_id=3, kind="train", base_version=0,
                  base_digest=blobs.put(arrays_to_bytes(init_arrays(CFG, seed=0))),
                  data_start=0, data_end=256, data_digest=blobs.put(tokens.tobytes()),
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  inner_steps=STEPS, batch_size=2, seq_len=8, lr=1e-3, weight_decay=0.0,
                  seed=1, deadline=time.time() + 60, nonce=NONCE)
    return work_content(lease, dataclasses.asdict(CFG))


class Steps:
    """A progress factory that records each step and sets ``leaving`` after step ``at``."""

    def __init__(self, leaving: threading.Event, at: int | None) -> None:
        self.leaving, self.at = leaving, at
        self.steps: list[int] = []
        self.notes: list[str] = []

    def __call__(self, kind: str, rnd: int, shard: int, steps: int):  # type: ignore[no-untyped-def]
        def report(step: int, steps: int, tokens: int, *, done: bool = False,
                   note: str = "") -> None:
            if done:
                self.notes.append(note or "done")
                return
            self.steps.append(step)
            if step == self.at:
                self.leaving.set()  # SIGUSR1 arriving while this step ran
        return report


def settings(blobs: BlobDir, gate: LeaseGate | None) -> WorkerSettings:
    return WorkerSettings(node_id=1, key=generate_key(), threads=1, device="cpu",
                          limits=NodeLimits(), cache=blobs, gate=gate)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobDir:
    return BlobDir(tmp_path / "blobs")


def test_leaving_mid_lease_hands_back_after_the_current_step(blobs: BlobDir) -> None:
    leaving = threading.Event()
    steps = Steps(leaving, at=2)
    reply = do_work(work(blobs), settings(blobs, LeaseGate(leaving=leaving)), steps)
    back = parse_handback(reply)
    assert back is not None, "an error or a finished update instead of a hand-back"
    assert back.nonce == NONCE and back.retry_after_s == LEAVING_RETRY_S
    assert "shutting down" in back.reason
    assert steps.steps == [1, 2]  # step 2 finished, step 3 never began
    assert steps.notes == ["handed back"]  # the terminal shows the node idle again


def test_without_the_signal_the_lease_is_trained_to_the_end(blobs: BlobDir) -> None:
    steps = Steps(threading.Event(), at=None)
    update, _ = parse_reply(do_work(work(blobs), settings(blobs, LeaseGate(
        leaving=threading.Event())), steps))
    assert steps.steps == list(range(1, STEPS + 1)) and update.metrics.steps == STEPS


def test_finished_work_is_never_handed_back(blobs: BlobDir) -> None:
    leaving = threading.Event()
    steps = Steps(leaving, at=STEPS)  # the signal came during the last step
    update, _ = parse_reply(do_work(work(blobs), settings(blobs, LeaseGate(leaving=leaving)),
                                    steps))
    assert update.metrics.steps == STEPS


def test_a_lease_arriving_while_leaving_or_outside_the_window_is_not_begun(tmp_path: Path,
                                                                            blobs: BlobDir
                                                                            ) -> None:
    content = work(blobs)
    empty = BlobDir(tmp_path / "empty")  # fetching anything would fail: nothing is fetched
    leaving = threading.Event()
    leaving.set()
    back = parse_handback(do_work(content, settings(empty, LeaseGate(leaving=leaving))))
    assert back is not None and back.retry_after_s == LEAVING_RETRY_S
    monday_noon = datetime(2024, 6, 3, 12, 0)
    nights = Policy.from_toml('windows = ["Mon-Fri 19:00-07:00"]')
    gate = LeaseGate(dataclasses.replace(nights, clock=lambda: monday_noon),
                     leaving=threading.Event())
    back = parse_handback(do_work(content, settings(empty, gate)))
    assert back is not None and back.retry_after_s == 7 * 3600
    assert back.reason == "outside this node's time windows (next opens Mon 19:00)"


def test_the_warm_worker_leaves_on_usr1_and_stops_on_term() -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    stop, leaving = threading.Event(), threading.Event()
    try:
        leave_on_signals(stop, leaving)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs in this (main) thread
        assert leaving.is_set() and not stop.is_set()  # it answers on: handing back
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.is_set()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# -- the supervisor: forward, wait for the reply to go out, exit 0 ---------------------------

ENROLLED = Enrollment(node_id=7, flower_node_id="123", name="gpu-box", institution="Uni X",
                      run_id="r", coordinator_address="127.0.0.1:1", fleet_address="127.0.0.1:2")

# A SuperNode that takes one message, as Flower 1.42 logs it, sends the reply once the worker
# has made it, and records on SIGTERM whether the reply had gone out.
FAKE_SUPERNODE = """
import pathlib, signal, sys, time
d = pathlib.Path({dir!r})
sent = False
def term(*_):
    (d / "supernode-stopped").write_text("after-send" if sent else "before-send")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("INFO :      Receiving: train.shard message (ID: 1f2e)", flush=True)
print("INFO :      Received successfully", flush=True)
(d / "received").touch()
while True:
    if not sent and (d / "replied").exists():
        time.sleep(0.3)  # the SuperNode polls its state every 0.5 s
        print("INFO :      Sending: train.shard message (ID: 3c4d)", flush=True)
        print("INFO :      Sent successfully", flush=True)
        sent = True
    time.sleep(0.05)
"""
# A worker holding a lease: SIGUSR1 finishes its step and hands the lease back.
FAKE_WORKER = """
import pathlib, signal, sys, time
d = pathlib.Path({dir!r})
def usr1(*_):
    time.sleep(0.5)  # the training step in progress
    (d / "replied").write_text("handed back")
def term(*_):
    (d / "worker-stopped").touch()
    sys.exit(0)
signal.signal(signal.SIGUSR1, usr1)
signal.signal(signal.SIGTERM, term)
(d / "worker-up").touch()
while True:
    time.sleep(0.05)
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "atom-supernode", FAKE_SUPERNODE.format(dir=str(tmp_path)))
    _script(bin_dir / "fake-worker", FAKE_WORKER.format(dir=str(tmp_path)))
    (tmp_path / "home").mkdir()
    return tmp_path


def _patch(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    real = supervisor.flower_env
    monkeypatch.setattr(supervisor, "flower_env", lambda home: {
        **real(home), "PATH": f"{d / 'bin'}{os.pathsep}{real(home)['PATH']}"})
    monkeypatch.setattr(supervisor, "worker_command",
                        lambda port, secret: [str(d / "bin" / "fake-worker")])


def _wait_for(*paths: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < end, f"never appeared: {[p for p in paths if not p.exists()]}"
        time.sleep(0.05)


def _supervise(d: Path, how: str) -> int:
    sup = Supervisor(NodeHome(d / "home"), ENROLLED, quiet_s=0.5, leave_s=15,
                     console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(sup.run()))
    t.start()
    _wait_for(d / "received", d / "worker-up")
    getattr(sup, how)()
    t.join(30)
    assert not t.is_alive()
    return result[0]


def test_leaving_waits_for_the_hand_back_to_go_out(fakes: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _patch(monkeypatch, fakes)
    assert _supervise(fakes, "request_leave") == 0
    assert (fakes / "replied").read_text() == "handed back"  # the worker got SIGUSR1
    assert (fakes / "supernode-stopped").read_text() == "after-send"
    assert (fakes / "worker-stopped").exists()


def test_a_plain_stop_does_not_wait(fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what leaving adds: without it the SuperNode goes before any reply could
    _patch(monkeypatch, fakes)
    assert _supervise(fakes, "request_stop") == 0
    assert not (fakes / "replied").exists()
    assert (fakes / "supernode-stopped").read_text() == "before-send"


DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from rich.console import Console
from node import supervisor
from node.identity import Enrollment, NodeHome
d = Path({dir!r})
real = supervisor.flower_env
supervisor.flower_env = lambda home: {{**real(home),
                                      "PATH": f"{{d / 'bin'}}:{{real(home)['PATH']}}"}}
supervisor.worker_command = lambda port, secret: [str(d / "bin" / "fake-worker")]
e = Enrollment(node_id=7, flower_node_id="123", name="gpu-box", institution="Uni X",
               run_id="r", coordinator_address="127.0.0.1:1", fleet_address="127.0.0.1:2")
sup = supervisor.Supervisor(NodeHome(d / "home"), e, quiet_s=0.5, leave_s=15,
                            console=Console(file=open(os.devnull, "w")))
sys.exit(sup.run())
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_the_signal_of_a_batch_job_hands_back_and_exits_0(fakes: Path, sig: int) -> None:
    driver = fakes / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), dir=str(fakes)))
    proc = subprocess.Popen([sys.executable, str(driver)], start_new_session=True)
    try:
        _wait_for(fakes / "received", fakes / "worker-up")
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (fakes / "replied").read_text() == "handed back"
    assert (fakes / "supernode-stopped").read_text() == "after-send"


def test_a_whole_process_tree_stopped_at_once_exits_promptly(fakes: Path) -> None:
    # a demo's teardown signals the node and its children together: the SuperNode is gone
    # at once, so there is nothing to wait for (and no 10 s until SIGKILL per node)
    driver = fakes / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), dir=str(fakes)))
    proc = subprocess.Popen([sys.executable, str(driver)], start_new_session=True)
    try:
        _wait_for(fakes / "received", fakes / "worker-up")
        t0 = time.monotonic()
        stop(proc)
        assert time.monotonic() - t0 < 5 and proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_messages_in_flight_reads_the_supernode_log(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text("INFO :      Receiving: train.shard message (ID: a)\n"
                   "INFO :      Received successfully\n")
    assert messages_in_flight(log, 0) == (1, 1)
    with log.open("a") as f:
        f.write("INFO :      Sending: train.shard message (ID: b)\n"
                "INFO :      Sent successfully\n"
                "INFO :      Receiving: evaluate.shard message (ID: c)\n")
    assert messages_in_flight(log, 0) == (2, 1)
    with log.open("a") as f:
        f.write("ERROR :     Failed to send message c: ...\n")
    assert messages_in_flight(log, 0) == (2, 0)
    assert messages_in_flight(tmp_path / "none.log", 0) == (0, 0)


def test_the_log_lines_are_the_ones_flower_writes() -> None:
    # the SuperNode's own wording (flwr pinned in pyproject): a change fails here, not in a
    # batch job that waits its whole grace for a line that never comes
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    for marker in (supervisor._RECEIVING, *supervisor._SETTLED):
        assert marker in source, marker

"""The join supervisor restarts a SuperNode that exits, with backoff, and stops on request."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from protocol.errors import EnrollmentError
from node.identity import Enrollment, NodeHome
from node import supervisor
from node.supervisor import Supervisor, supernode_command
from node.supernode import JUST_JOINED

ENROLLED = Enrollment(node_id=7, flower_node_id="123", name="gpu-box", institution="Uni X",
                      run_id="r", coordinator_address="127.0.0.1:1",
                      fleet_address="127.0.0.1:2")


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_supernode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `atom-supernode` first on PATH that records each start and exits at once, and a
    warm worker that records each start and stays up."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    starts = tmp_path / "starts"
    # each start's line: whether it is the join's first (JUST_JOINED), then its arguments
    _script(bin_dir / "atom-supernode",
            f"echo \"${{{JUST_JOINED}:-0}} $@\" >> {starts}\nexit 3")
    # (the environment first: a line in worker-starts means it was written)
    worker = _script(bin_dir / "fake-worker", "echo \"$TORCHINDUCTOR_CACHE_DIR\" > "
                                              f"{tmp_path / 'worker-compile-cache'}\n"
                                              f"echo \"$@\" >> {tmp_path / 'worker-starts'}\n"
                                              "exec sleep 60")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # a user's own is kept
    real_flower_env = supervisor.flower_env

    def env_with_fake_first(flwr_home: Path) -> dict[str, str]:
        env = real_flower_env(flwr_home)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"  # ahead of the venv's real one
        return env

    monkeypatch.setattr(supervisor, "flower_env", env_with_fake_first)
    monkeypatch.setattr(supervisor, "worker_command",
                        lambda port, secret: [str(worker), "--runtime-api",
                                              f"127.0.0.1:{port}"])
    return starts


def test_restarts_with_backoff_and_stops_cleanly(tmp_path: Path, fake_supernode: Path) -> None:
    home = NodeHome(tmp_path / "home")
    home.path.mkdir()
    sup = Supervisor(home, ENROLLED, threads=2, device="cpu",
                     console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(sup.run()))
    t.start()
    time.sleep(4.5)  # starts at ~0 s, ~1 s, ~3 s (backoff 1 s, then 2 s)
    sup.request_stop()
    t.join(10)
    assert not t.is_alive() and result == [0]
    starts = fake_supernode.read_text().splitlines()
    assert 2 <= len(starts) <= 4, starts
    # the first asks for its first lease at once; a restart (after the SuperLink's, every
    # node's at once) at Flower's pace
    assert starts[0].startswith("1 ") and all(s.startswith("0 ") for s in starts[1:])
    assert "--auth-supernode-private-key" in starts[0] and "127.0.0.1:2" in starts[0]
    assert "--isolation process" in starts[0]  # no flwr-clientapp per message
    secret = home.path / "runtime.secret"  # only the worker may claim the node's tasks
    assert f"--superexec-auth-secret-file {secret}" in starts[0]
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    # a worker beside each SuperNode, on that SuperNode's Runtime API port (a SuperNode that
    # exits at once may take its worker down before the worker's script has said a word)
    workers = (tmp_path / "worker-starts").read_text().splitlines()
    ports = [s.split("--port ")[1].split()[0] for s in starts]
    assert 1 <= len(workers) <= len(starts)
    assert all(w.rsplit(":", 1)[1] in ports for w in workers)
    # its compiled kernels outlive the worker (and /tmp cleaners): in the node's home
    cache = (tmp_path / "worker-compile-cache").read_text().strip()
    assert cache == str(home.compile_cache_path)


def test_a_dead_worker_is_restarted_alone(tmp_path: Path, fake_supernode: Path) -> None:
    """The SuperNode stays up; the worker dies at once each time and comes back with
    backoff (1 s, 2 s): the node keeps its place in the network."""
    _script(tmp_path / "bin" / "atom-supernode", f"echo \"$@\" >> {fake_supernode}\n"
                                                   "exec sleep 60")
    _script(tmp_path / "bin" / "fake-worker",
            f"echo \"$@\" >> {tmp_path / 'worker-starts'}\nexit 9")
    home = NodeHome(tmp_path / "home")
    home.path.mkdir()
    sup = Supervisor(home, ENROLLED, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    t = threading.Thread(target=sup.run)
    t.start()
    time.sleep(4.5)  # worker starts at ~0 s, ~1.5 s, ~3.5 s
    sup.request_stop()
    t.join(10)
    assert not t.is_alive()
    assert len(fake_supernode.read_text().splitlines()) == 1
    assert 2 <= len((tmp_path / "worker-starts").read_text().splitlines()) <= 4


def test_gives_up_when_the_coordinator_refuses_the_key(
        tmp_path: Path, fake_supernode: Path) -> None:
    _script(tmp_path / "bin" / "atom-supernode", f"echo \"$@\" >> {fake_supernode}\n"
                                                   "echo 'ERROR: Failed to activate SuperNode.'"
                                                   "\nexit 49")
    home = NodeHome(tmp_path / "home")
    home.path.mkdir()
    sup = Supervisor(home, ENROLLED, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    with pytest.raises(EnrollmentError, match="refuses this node's key"):
        sup.run()
    assert len(fake_supernode.read_text().splitlines()) == 3


def test_supernode_command_carries_key_ca_and_node_config(tmp_path: Path) -> None:
    home = NodeHome(tmp_path)
    cmd = supernode_command(home, ENROLLED, port=9999, threads=1, device="cuda:1",
                            sign_key=None, secret_file=tmp_path / "runtime.secret")
    assert cmd[:3] == ["atom-supernode", "--superlink", "127.0.0.1:2"]
    assert cmd[cmd.index("--root-certificates") + 1] == str(home.ca_path)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(home.key_path)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'home="{tmp_path}"' in node_config and 'device="cuda:1"' in node_config
    assert "slowdown" not in node_config
    slow = supernode_command(home, ENROLLED, port=9999, threads=1, device="cpu",
                             sign_key=None, secret_file=tmp_path / "runtime.secret", slowdown=4)
    assert "slowdown=4.0" in slow[slow.index("--node-config") + 1]
    assert "checkpointing" not in node_config
    ckpt = supernode_command(home, ENROLLED, port=9999, threads=1, device="cpu",
                             sign_key=None, secret_file=tmp_path / "runtime.secret",
                             checkpointing=True)
    assert "checkpointing=true" in ckpt[ckpt.index("--node-config") + 1]
    assert "compile" not in node_config  # auto: the worker's default
    eager = supernode_command(home, ENROLLED, port=9999, threads=1, device="cuda",
                              sign_key=None, secret_file=tmp_path / "runtime.secret",
                              compile_mode="off")
    assert 'compile="off"' in eager[eager.index("--node-config") + 1]


def test_slowdown_waits_so_the_work_takes_that_many_times_as_long(monkeypatch) -> None:
    # atom-node join --slowdown F (benchmarks: a slower device): after work that took t
    # seconds, the worker waits (F - 1) t, so the wall_s it reports is F t
    import node.worker as worker

    now = [100.0]
    waits: list[float] = []
    monkeypatch.setattr(worker.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(worker.time, "sleep", waits.append)
    now[0] = 103.0  # the work took 3 s
    worker._play_slower(4.0, 100.0)
    worker._play_slower(1.0, 100.0)  # no slowdown: no wait
    assert waits == [9.0]


def test_join_without_atom_supernode_installed_is_one_line_before_enrolling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a checkout updated without `pip install -e .` again lacks the new console script:
    # one line that says what to do, before the invite token is spent
    from typer.testing import CliRunner

    from node.cli import app as node_app

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setattr(supervisor, "tool_path", lambda: str(empty))
    enrolled = []
    monkeypatch.setattr("node.cli.enroll", lambda *a: enrolled.append(a))
    res = CliRunner().invoke(node_app, ["join", "127.0.0.1:1", "--token", "x", "--home",
                                        str(tmp_path / "home"), "--metrics", ""])
    assert res.exit_code == 1 and not enrolled
    assert "atom-supernode is not installed" in res.output
    assert "pip install -e ." in res.output and "Traceback" not in res.output
    _script(empty / "atom-supernode", "exit 0")
    supervisor.check_installed()  # found: nothing to say

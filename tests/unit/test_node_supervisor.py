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

ENROLLED = Enrollment(node_id=7, flower_node_id="123", name="gpu-box", institution="Uni X",
                      run_id="r", coordinator_address="127.0.0.1:1",
                      fleet_address="127.0.0.1:2")


@pytest.fixture
def fake_supernode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `flower-supernode` first on PATH that records each start and exits at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    starts = tmp_path / "starts"
    script = bin_dir / "flower-supernode"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {starts}\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    real_guarded_env = supervisor.guarded_env

    def env_with_fake_first(env: dict[str, str], guard_bin: Path) -> dict[str, str]:
        env = real_guarded_env(env, guard_bin)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"  # ahead of the venv's real one
        return env

    monkeypatch.setattr(supervisor, "guarded_env", env_with_fake_first)
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
    assert "--auth-supernode-private-key" in starts[0] and "127.0.0.1:2" in starts[0]


def test_gives_up_when_the_coordinator_refuses_the_key(
        tmp_path: Path, fake_supernode: Path) -> None:
    script = tmp_path / "bin" / "flower-supernode"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {fake_supernode}\n"
                      "echo 'ERROR: Failed to activate SuperNode.'\nexit 49\n")
    home = NodeHome(tmp_path / "home")
    home.path.mkdir()
    sup = Supervisor(home, ENROLLED, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    with pytest.raises(EnrollmentError, match="refuses this node's key"):
        sup.run()
    assert len(fake_supernode.read_text().splitlines()) == 3


def test_supernode_command_carries_key_ca_and_node_config(tmp_path: Path) -> None:
    home = NodeHome(tmp_path)
    cmd = supernode_command(home, ENROLLED, port=9999, threads=1, device="cuda:1",
                            sign_key=None)
    assert cmd[:3] == ["flower-supernode", "--superlink", "127.0.0.1:2"]
    assert cmd[cmd.index("--root-certificates") + 1] == str(home.ca_path)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(home.key_path)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'home="{tmp_path}"' in node_config and 'device="cuda:1"' in node_config

"""A hostile FAB never runs on a node: real SuperLink (TLS + node auth) and guarded SuperNode.

The run's FAB carries ``node/client_app.py``, which would shadow the installed ClientApp and
write a marker file. The node must refuse the bundle before unpacking it, and the ServerApp
must get an error reply saying so.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from pathlib import Path

from coordinator.services.pki import make_pki
from coordinator.services.superlink import SuperLink
from node.flower_runtime import RuntimeTasks
from node.identity import Enrollment, NodeHome
from node.supervisor import new_runtime_secret, supernode_command, worker_command
from protocol.processes import flower_env, free_port, spawn, stop
from protocol.signing import public_key_pem

_SERVERAPP = '''
import json, time
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    out = Path(str(context.run_config["out"]))
    end = time.time() + 40
    while not (nodes := list(grid.get_node_ids())) and time.time() < end:
        time.sleep(0.5)
    msg = Message(content=RecordDict(), dst_node_id=nodes[0], message_type="train.shard")
    replies = list(grid.send_and_receive([msg], timeout=40))
    out.write_text(json.dumps([
        {"error": r.has_error(), "reason": r.error.reason if r.has_error() else ""}
        for r in replies]))
'''

_EVIL_CLIENTAPP = '''
from pathlib import Path
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("FAB code ran on the node")
app = ClientApp()


@app.train("shard")
def train(msg, context):
    Path({marker!r}).write_text("FAB ClientApp ran on the node")
    return msg.create_reply(msg.content)
'''

_PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "atom-network"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "atom"

[tool.flwr.app.components]
serverapp = "fabtest_server:app"
clientapp = "node.client_app:app"

[tool.flwr.app.config]
out = ""
'''


def _wait_for(path: Path, timeout: float, procs: list) -> bool:  # type: ignore[type-arg]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size:
            return True
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.3)
    return False


def test_hostile_fab_is_refused_before_it_is_unpacked(workdir: Path, tmp_path: Path) -> None:
    workdir.mkdir(parents=True)
    (workdir / "logs").mkdir()
    tls = make_pki(workdir / "tls", ["127.0.0.1"])
    link = SuperLink(workdir, tls, "127.0.0.1", free_port())
    marker, out = tmp_path / "MARKER", tmp_path / "replies.json"
    home = NodeHome(tmp_path / "node-home")
    node = worker = None
    try:
        link.start()
        key = home.key()
        flower_id = link.register_node(public_key_pem(key), "guarded")
        e = Enrollment(node_id=1, flower_node_id=str(flower_id), name="guarded",
                       institution="Uni", run_id="r", coordinator_address="127.0.0.1:1",
                       fleet_address=link.local_address)
        home.save_enrollment(e, tls.ca_cert.read_bytes(), b"")
        # exactly what the join supervisor runs: the SuperNode and the warm worker beside it
        env = flower_env(home.path / "flwr-home")
        port = free_port()
        secret = new_runtime_secret(home)
        cmd = supernode_command(home, e, port=port, threads=1, device="cpu", sign_key=None,
                                secret_file=secret)
        node = spawn(cmd, env=env, log=tmp_path / "supernode.log")
        worker = spawn(worker_command(port, secret), env=env, log=tmp_path / "worker.log")
        link.start_run({"out": str(out)}, files={
            "pyproject.toml": _PYPROJECT.encode(),
            "fabtest_server.py": _SERVERAPP.encode(),
            "node/__init__.py": b"",
            "node/client_app.py": _EVIL_CLIENTAPP.format(marker=str(marker)).encode(),
        })
        assert _wait_for(out, 55, [link.proc, node, worker]), (
            (tmp_path / "supernode.log").read_text(errors="replace")[-3000:]
            + (tmp_path / "worker.log").read_text(errors="replace")[-3000:])
        # no other process on the machine can claim the node's tasks without its secret
        intruder = RuntimeTasks(f"127.0.0.1:{port}", b"not the secret")
        with pytest.raises(httpx.HTTPStatusError):
            intruder.acquire()
        intruder.close()
    finally:
        stop(worker)
        stop(node)
        link.stop()
    replies = json.loads(out.read_text())
    assert len(replies) == 1 and replies[0]["error"], replies
    assert "FAB rejected by node policy" in replies[0]["reason"], replies
    assert not marker.exists()
    # nothing of the bundle reached the node's disk
    apps = home.path / "flwr-home" / "apps"
    assert not apps.exists() or not any(apps.rglob("*.py"))

"""The public Flower port serves the Fleet API only: real SuperLink on loopback + Fleet proxy.

Flower's Control API (register keys, start runs, unregister nodes) has no authentication; it
must answer on the coordinator's loopback address and nowhere else.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import pytest

from coordinator.services.fleet_proxy import MAX_BODY, FleetProxy
from coordinator.services.pki import make_pki
from coordinator.services.superlink import SuperLink
from node.identity import Enrollment, NodeHome
from node.supervisor import new_runtime_secret, supernode_command
from protocol.errors import NetworkError
from protocol.processes import flower_env, free_port, spawn, stop
from protocol.signing import generate_key, public_key_pem


def test_control_api_only_on_loopback_and_nodes_still_connect(workdir: Path,
                                                                tmp_path: Path) -> None:
    (workdir / "logs").mkdir(parents=True)
    tls = make_pki(workdir / "tls", ["127.0.0.1"])
    private, public = free_port(), free_port()
    link = SuperLink(workdir, tls, "127.0.0.1", private)
    proxy = FleetProxy(workdir, tls.server_cert, tls.server_key, tls.ca_cert, "127.0.0.1",
                       public, private)
    outside = SuperLink(workdir, tls, "127.0.0.1", public)  # the Control API, from outside
    node = None
    try:
        link.start()
        proxy.start()
        # the same Control API calls: refused on the public port, served on loopback
        with pytest.raises(NetworkError):
            outside.node_statuses()
        with pytest.raises(NetworkError):
            outside.register_node(public_key_pem(generate_key()), "mallory")
        with pytest.raises(NetworkError):
            outside.run_status(1)
        assert link.node_statuses() == {}  # mallory's key never got in

        ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{public}", verify=ctx,
                          trust_env=False) as web:
            assert web.get("/health").status_code == 200
            for path in ("/v1/control/list-nodes", "/v1/control/register-node",
                         "/v1/control/start-run", "/v1/runtime/pull-task-input",
                         "/v1/fleet/x/../../control/list-nodes"):
                assert web.post(path, content=b"").status_code == 403, path
            for path in ("/docs", "/openapi.json", "/", "/v1/fleetx/pull-messages"):
                assert web.get(path).status_code == 404, path
            assert web.get("/v1/fleet/pull-messages").status_code == 405
            # a Fleet call goes through (and the SuperLink itself refuses a junk one)
            junk = web.post("/v1/fleet/pull-messages", content=b"\x00junk",
                            headers={"content-type": "application/protobuf"})
            assert junk.status_code not in (403, 404, 405, 502), junk.status_code
            big = web.post("/v1/fleet/push-object", content=b"\0" * (MAX_BODY + 1))
            assert big.status_code == 413

        # a SuperNode through the proxy, exactly as a node runs it, comes online
        home = NodeHome(tmp_path / "node-home")
        fid = link.register_node(public_key_pem(home.key()), "via-proxy")
        e = Enrollment(node_id=1, flower_node_id=str(fid), name="via-proxy", institution="U",
                       run_id="r", coordinator_address="127.0.0.1:1",
                       fleet_address=f"127.0.0.1:{public}")
        home.save_enrollment(e, tls.ca_cert.read_bytes(), b"")
        node = spawn(supernode_command(home, e, port=free_port(), threads=1, device="cpu",
                                       sign_key=None, secret_file=new_runtime_secret(home)),
                     env=flower_env(home.path / "flwr-home"), log=tmp_path / "supernode.log")
        end = time.monotonic() + 40
        while link.node_statuses().get(fid) != "online" and time.monotonic() < end:
            assert node.poll() is None, (tmp_path / "supernode.log").read_text()[-2000:]
            time.sleep(0.5)
        assert link.node_statuses().get(fid) == "online"
    finally:
        stop(node)
        proxy.stop()
        link.stop()

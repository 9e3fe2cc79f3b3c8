"""Revocation and the Control API with the real coordinator stack (``Coordinator``: SuperLink on
loopback, Fleet proxy on the public port) and a real SuperNode connected through the proxy."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from coordinator.rundir import RunDir, init_run
from coordinator.services.launcher import Coordinator
from coordinator.services.revocation import revoke_node, running_superlink
from coordinator.services.superlink import SuperLink
from node.credits import credits_report
from node.identity import Enrollment, NodeHome
from node.supervisor import new_runtime_secret, supernode_command
from protocol.errors import NetworkError
from protocol.processes import flower_env, free_port, spawn, stop
from protocol.signing import fingerprint, generate_key, public_key_pem


def _enroll(coord: Coordinator, home: NodeHome, name: str) -> tuple[int, Enrollment]:
    """Register ``home``'s key as enrollment would; return (ledger id, enrollment)."""
    assert coord.superlink is not None
    pem = public_key_pem(home.key())
    fid = coord.superlink.register_node(pem, name)
    inst = coord.ledger.add_institution("Uni")
    node = coord.ledger.add_node(fid, name, inst.id, pem, fingerprint(pem))
    assert node.id is not None
    e = Enrollment(node_id=node.id, flower_node_id=str(fid), name=name, institution="Uni",
                   run_id="r",
                   coordinator_address=f"127.0.0.1:{coord.cfg.network.coordinator_port}",
                   fleet_address=coord.rd.fleet_address(coord.cfg))
    home.save_enrollment(e, coord.rd.tls.ca_cert.read_bytes(), coord.rd.public_key_pem())
    return node.id, e


def _supernode(home: NodeHome, e: Enrollment, log: Path) -> subprocess.Popen[bytes]:
    return spawn(supernode_command(home, e, port=free_port(), threads=1, device="cpu",
                                   sign_key=None, secret_file=new_runtime_secret(home)),
                 env=flower_env(home.path / "flwr-home"), log=log)


def _until(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.5)
    return False


def test_control_api_refused_publicly_and_revocation_live_and_at_start(
        workdir: Path, tmp_path: Path) -> None:
    fleet = free_port()
    rd = init_run(workdir, network_fleet_port=fleet, network_coordinator_port=free_port(),
                  network_metrics_address=f"127.0.0.1:{free_port()}",
                  data_max_bytes=200_000, data_val_every=5)
    live, later = NodeHome(tmp_path / "live"), NodeHome(tmp_path / "later")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with Coordinator(RunDir(rd.path)) as coord:
            assert coord.superlink is not None
            # Control API: the loopback port answers; the public fleet address refuses
            public = SuperLink(rd.path, rd.tls, "127.0.0.1", fleet)
            with pytest.raises(NetworkError):
                public.register_node(public_key_pem(generate_key()), "mallory")
            with pytest.raises(NetworkError):
                public.node_statuses()
            assert coord.superlink.node_statuses() == {}
            link = running_superlink(rd)  # what `revoke-node` finds from another process
            assert link is not None and link.port == coord.superlink.port != fleet

            live_id, live_e = _enroll(coord, live, "live")
            later_id, _ = _enroll(coord, later, "later")
            # the running coordinator's service hands a node its statement, sealed with the
            # run's key (nothing earned yet: an empty statement still verifies)
            report = credits_report(live)
            assert (report.node_id, report.receipts_verified, report.total.credits) == \
                (live_id, 0, 0.0)
            node = _supernode(live, live_e, tmp_path / "live.log")
            procs.append(node)
            fid = int(live_e.flower_node_id)
            assert _until(lambda: coord.superlink.node_statuses().get(fid) == "online", 40), \
                (tmp_path / "live.log").read_text()[-2000:]

            # revoked while running: the key is dropped now and the SuperNode is cut off
            r = revoke_node(rd, live_id)
            assert r.unregistered
            assert coord.superlink.node_statuses()[fid] == "unregistered"
            assert _until(lambda: node.poll() is not None, 30), "SuperNode kept running"
            assert coord.ledger.node(live_id).revoked
        assert running_superlink(rd) is None  # stopped: no state left behind

        # revoked while the coordinator is down: its key goes at the next start
        r = revoke_node(rd, later_id)
        assert not r.unregistered
        with Coordinator(RunDir(rd.path)) as coord:
            assert coord.superlink is not None
            statuses = coord.superlink.node_statuses()
            assert statuses[int(r.flower_node_id)] == "unregistered"
            assert statuses[fid] == "unregistered"
    finally:
        for p in procs:
            stop(p)

"""A coordinator's status service over the fixture ledger, for the status RPC and live TUI tests.

The real gRPC service with TLS on 127.0.0.1 (a run directory's CA, server certificate and
coordinator key), serving a read-only copy of the fixture ledger in which node 2 (borealis)
has a real key. The desk's clock is the fixture's NOW, so views equal those computed locally.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from coordinator.ledger import Ledger
from coordinator.rundir import RunDir, init_run
from coordinator.services.enrollment import Enroller
from coordinator.services.grpc_service import CoordinatorService, serve
from coordinator.services.status import StatusDesk
from coordinator.services.status_watch import POLL_S, StatusWatch
from protocol.processes import free_port
from protocol.signing import (
    fingerprint, generate_key, load_private_key, public_key_pem, save_private_key,
)
from tests.fixture_ledger import NOW, RUN_ID, FixtureRun
from tui.coordinator_source import CoordinatorSource

__all__ = ["CONTRIBUTOR", "StatusWorld", "serving", "status_world", "writable_world"]

CONTRIBUTOR = 2  # borealis: the node whose key the world holds


@dataclass
class StatusWorld:
    rd: RunDir
    url: str  # the ledger the service reads (a copy of the fixture ledger)
    address: str
    ca_pem: bytes
    coordinator_key: ec.EllipticCurvePrivateKey
    node_key: ec.EllipticCurvePrivateKey  # node CONTRIBUTOR's registered key
    node_home: Path  # that node's home: node.key, ca.pem, node.json

    def source(self, *, node_id: int | None = None, key: ec.EllipticCurvePrivateKey | None = None,
               clock: Callable[[], float] = lambda: NOW, address: str | None = None
               ) -> CoordinatorSource:
        """The team's source (``node_id=None``) or node ``node_id``'s, with its own key unless
        ``key`` names another."""
        if key is None:
            key = self.coordinator_key if node_id is None else self.node_key
        return CoordinatorSource(address or self.address, self.ca_pem, key, node_id, clock=clock)


@contextmanager
def serving(rd: RunDir, url: str, clock: Callable[[], float], *, port: int | None = None,
            watch_poll_s: float = POLL_S) -> Iterator[str]:
    """The coordinator's gRPC service (TLS) over ``url`` read-only, its status streams
    checking the ledger every ``watch_poll_s``; yields its address."""
    ledger = Ledger.read_only(url)
    port = port or free_port()
    pem = rd.public_key_pem()
    desk = StatusDesk(ledger, RUN_ID, pem, clock=clock)
    service = CoordinatorService(Enroller(ledger, lambda key, name: 0), RUN_ID, "127.0.0.1:1",
                                 pem, status=desk,
                                 watch=StatusWatch(desk, poll_s=watch_poll_s))
    server = serve(service, "127.0.0.1", port, rd.tls.server_cert.read_bytes(),
                   rd.tls.server_key.read_bytes())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        service.close()
        server.stop(grace=None).wait()
        ledger.close()


def _give_real_key(path: Path, node_id: int, key: ec.EllipticCurvePrivateKey) -> None:
    pem = public_key_pem(key).decode()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE nodes SET public_key_pem = :pem, fingerprint = :fp "
                          "WHERE id = :id"), {"pem": pem, "fp": fingerprint(pem), "id": node_id})
    engine.dispose()


def _node_home(path: Path, key: ec.EllipticCurvePrivateKey, ca_pem: bytes, address: str) -> Path:
    path.mkdir()
    save_private_key(key, path / "node.key")
    (path / "ca.pem").write_bytes(ca_pem)
    enrollment: dict[str, Any] = {
        "node_id": CONTRIBUTOR, "flower_node_id": "1002", "name": "borealis",
        "institution": "Beta Institute of Technology", "run_id": RUN_ID,
        "coordinator_address": address, "fleet_address": "127.0.0.1:1"}
    (path / "node.json").write_text(json.dumps(enrollment))
    return path


@pytest.fixture(scope="session")
def status_world(fixture_ledger: FixtureRun,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[StatusWorld]:
    """The status service at the fixture's NOW, for the whole session (only read it)."""
    base = tmp_path_factory.mktemp("status")
    rd = init_run(base / "run", run_id=RUN_ID)
    path = base / "ledger.db"
    shutil.copyfile(fixture_ledger.path, path)
    node_key = generate_key()
    _give_real_key(path, CONTRIBUTOR, node_key)
    url = f"sqlite:///{path}"
    ca_pem = rd.tls.ca_cert.read_bytes()
    with serving(rd, url, lambda: NOW) as address:
        yield StatusWorld(rd, url, address, ca_pem, load_private_key(rd.key_path), node_key,
                          _node_home(base / "home", node_key, ca_pem, address))


@pytest.fixture
def writable_world(status_world: StatusWorld, tmp_path: Path) -> Iterator[StatusWorld]:
    """The world over a private copy of its ledger, which a test may write to
    (``Ledger(world.url)``, as the run loop would), its status streams checking for changes
    every 0.1 s."""
    path = tmp_path / "ledger.db"
    shutil.copyfile(status_world.url.removeprefix("sqlite:///"), path)
    url = f"sqlite:///{path}"
    with serving(status_world.rd, url, lambda: NOW, watch_poll_s=0.1) as address:
        yield dataclasses.replace(status_world, url=url, address=address)

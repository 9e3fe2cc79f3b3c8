"""The status RPC: signed requests, who may read which view, and views that survive JSON.

Real gRPC with TLS on 127.0.0.1 over the fixture ledger (tests/status_world.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.ledger import Ledger
from coordinator.services.pki import make_pki
from coordinator.services.views import (
    EventsView, NetworkView, NodeDetail, ProgressView, RunInfo, events_view, network_view,
    node_detail, progress_view, run_info,
)
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.errors import (
    ConfigError, EnrollmentError, LedgerError, NetworkError, ProtocolError,
)
from protocol.processes import free_port
from protocol.signing import generate_key
from protocol.status import TEAM, StatusQuery, sign_status_query, status_request_bytes
from tests.fixture_ledger import NOW, RUN_ID, FixtureRun
from tests.status_world import CONTRIBUTOR, StatusWorld, status_world
from tui.coordinator_source import CoordinatorSource, read_ca

__all__ = ["status_world"]

OTHER_NAMES = ("aurora", "cygnus", "draco", "Uni Alpha", "Gamma College")
CODE = grpc.StatusCode


def call(world: StatusWorld, query: StatusQuery, key: ec.EllipticCurvePrivateKey,
         **changed: Any) -> tuple[grpc.StatusCode, Any]:
    """Sign ``query`` with ``key``, send it with ``changed`` fields (after signing)."""
    fields = {**dataclasses.asdict(query), **changed}
    request = pb.StatusRequest(**fields, signature=sign_status_query(query, key))
    creds = grpc.ssl_channel_credentials(root_certificates=world.ca_pem)
    with grpc.secure_channel(world.address, creds) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).GetStatus(request, timeout=10)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return CODE.OK, json.loads(reply.json)


def team(view: str, *, timestamp: float = NOW, **kw: Any) -> StatusQuery:
    return StatusQuery(view=view, requester_node_id=TEAM, timestamp=timestamp, **kw)


def mine(view: str = "node", node_id: int = CONTRIBUTOR, **kw: Any) -> StatusQuery:
    return StatusQuery(view=view, node_id=node_id, requester_node_id=CONTRIBUTOR,
                       timestamp=NOW, **kw)


def test_status_request_bytes_are_the_documented_canonical_json() -> None:
    q = StatusQuery(view="node", node_id=2, since_event_id=0, requester_node_id=2,
                    timestamp=1_700_000_000)
    assert status_request_bytes(q) == (
        b'atom-status-request-v1\n{"node_id":2,"requester_node_id":2,"since_event_id":0,'
        b'"timestamp":1700000000.0,"view":"node"}')
    for bad in (dataclasses.replace(q, node_id=True), dataclasses.replace(q, view=3),
                dataclasses.replace(q, timestamp=float("nan")),
                dataclasses.replace(q, since_event_id=1.5)):
        with pytest.raises(ProtocolError):
            status_request_bytes(bad)  # type: ignore[arg-type]


def test_every_view_survives_json(fixture_ledger: FixtureRun) -> None:
    with Ledger.read_only(fixture_ledger.url) as ledger:
        views = [run_info(ledger, RUN_ID), network_view(ledger, NOW, RUN_ID),
                 progress_view(ledger), events_view(ledger, 3), node_detail(ledger, 2, NOW),
                 node_detail(ledger, 4, NOW)]
    for view in views:
        doc = json.loads(json.dumps(dataclasses.asdict(view)))
        assert type(view).from_dict(doc) == view
    doc = json.loads(json.dumps(dataclasses.asdict(views[1])))
    doc["header"]["future_field"] = 1  # a newer coordinator's view still reads
    assert NetworkView.from_dict(doc) == views[1]
    for broken, where in ((lambda d: d["nodes"][0].update(accepted="3"),
                           r"nodes\[0\]\.accepted must be int"),
                          (lambda d: d["header"].pop("online"), "has no online"),
                          (lambda d: d.update(nodes={}), "nodes must be a list"),
                          (lambda d: d["nodes"][1].update(tokens=True), "tokens")):
        doc = json.loads(json.dumps(dataclasses.asdict(views[1])))
        broken(doc)
        with pytest.raises(ProtocolError, match=where):
            NetworkView.from_dict(doc)


def test_the_team_reads_every_view_as_computed_on_the_ledger(status_world: StatusWorld) -> None:
    got = {view: call(status_world, team(view, **kw), status_world.coordinator_key)
           for view, kw in (("network", {}), ("progress", {}), ("events", {"since_event_id": 5}),
                            ("node", {"node_id": 3}))}
    assert {view: code for view, (code, _) in got.items()} == dict.fromkeys(got, CODE.OK)
    with Ledger.read_only(status_world.url) as ledger:
        assert NetworkView.from_dict(got["network"][1]["data"]) == network_view(ledger, NOW,
                                                                                 RUN_ID)
        assert ProgressView.from_dict(got["progress"][1]["data"]) == progress_view(ledger)
        assert EventsView.from_dict(got["events"][1]["data"]) == events_view(ledger, 5)
        assert NodeDetail.from_dict(got["node"][1]["data"]) == node_detail(ledger, 3, NOW)
        run = run_info(ledger, RUN_ID)
    for code, doc in got.values():
        assert doc["format"] == "atom-status-v1" and doc["at"] == NOW
        assert RunInfo.from_dict(doc["run"]) == run


def test_a_node_reads_its_own_node_view_and_nothing_of_the_others(
        status_world: StatusWorld) -> None:
    code, doc = call(status_world, mine(), status_world.node_key)
    assert code == CODE.OK
    with Ledger.read_only(status_world.url) as ledger:
        assert NodeDetail.from_dict(doc["data"]) == node_detail(ledger, CONTRIBUTOR, NOW)
    text = json.dumps(doc)
    assert "borealis" in text and not any(name in text for name in OTHER_NAMES)


@pytest.mark.parametrize("query", [
    mine("network"), mine("progress"), mine("events"), mine("node", node_id=3),
    mine("node", node_id=99), mine("nonsense")], ids=lambda q: f"{q.view}-{q.node_id}")
def test_a_node_key_is_denied_the_network(status_world: StatusWorld, query: StatusQuery) -> None:
    code, detail = call(status_world, query, status_world.node_key)
    assert code == CODE.PERMISSION_DENIED and "its own node view only" in detail


@pytest.mark.parametrize("case", ["node key as team", "mallory as team", "mallory as node",
                                  "stale", "future", "tampered", "other requester",
                                  "unknown requester"])
def test_a_request_not_signed_by_its_requester_is_refused(status_world: StatusWorld,
                                                          case: str) -> None:
    w, mallory = status_world, generate_key()
    query, key, changed = {
        "node key as team": (team("network"), w.node_key, {}),
        "mallory as team": (team("network"), mallory, {}),
        "mallory as node": (mine(), mallory, {}),
        "stale": (team("network", timestamp=NOW - 301), w.coordinator_key, {}),
        "future": (team("network", timestamp=NOW + 301), w.coordinator_key, {}),
        "tampered": (team("events"), w.coordinator_key, {"since_event_id": 7}),
        "other requester": (mine(), w.node_key, {"requester_node_id": 3, "node_id": 3}),
        "unknown requester": (mine(), w.node_key, {"requester_node_id": 99, "node_id": 99}),
    }[case]
    code, detail = call(w, query, key, **changed)
    assert code == CODE.UNAUTHENTICATED, (code, detail)
    if case in ("stale", "future"):
        assert "off the coordinator's clock" in detail
    # the same request, honestly signed and fresh, is answered (not a blanket refusal)
    if case in ("stale", "future", "tampered"):
        assert call(w, team("network"), w.coordinator_key)[0] == CODE.OK


def test_team_mistakes_have_their_own_codes(status_world: StatusWorld) -> None:
    assert call(status_world, team("node", node_id=99),
                status_world.coordinator_key) == (CODE.NOT_FOUND, "no node 99 in the ledger")
    code, detail = call(status_world, team("leaderboard"), status_world.coordinator_key)
    assert code == CODE.INVALID_ARGUMENT and "unknown view" in detail


def test_the_source_turns_refusals_into_one_line_errors(status_world: StatusWorld,
                                                       tmp_path: Path) -> None:
    w = status_world
    cases = [
        (w.source(key=generate_key()), EnrollmentError, "refused the status request"),
        (w.source(clock=lambda: NOW - 3600), EnrollmentError, "off the coordinator's clock"),
        (w.source(address=f"127.0.0.1:{free_port()}"), NetworkError, "cannot reach"),
    ]
    other_ca = make_pki(tmp_path / "tls", ["127.0.0.1"]).ca_cert.read_bytes()  # not the run's
    cases.append((CoordinatorSource(w.address, other_ca, w.coordinator_key, clock=lambda: NOW),
                  NetworkError, "cannot reach"))
    for source, error, message in cases:
        with pytest.raises(error, match=message) as info:
            source.check()
        assert "\n" not in str(info.value)
        source.close()
    source = w.source()
    with pytest.raises(LedgerError, match="no node 99"):
        source.check_node(99)
    source.close()
    contributor = w.source(node_id=CONTRIBUTOR)
    with pytest.raises(ConfigError, match="reads node 2's view only"):
        contributor.check_node(3)
    snap = contributor.fetch(NOW)  # network asked for, but a node's key reads its node only
    assert snap.detail is not None and snap.network is None and snap.events is None
    contributor.close()
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        read_ca(tmp_path / "garbage.pem")

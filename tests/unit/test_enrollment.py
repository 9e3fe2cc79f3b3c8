"""Enrollment end to end on loopback: the real gRPC service with real TLS, a fake SuperLink.

The coordinator side is ``CoordinatorService`` + ``Enroller`` over a SQLite ledger in a run
directory made by ``init_run``; the node side is ``node.enroll.enroll``. Only the SuperLink is
faked: ``register`` hands out uint64-sized Flower ids, or raises to play a SuperLink outage.
"""

from __future__ import annotations

import base64
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coordinator.ledger import Ledger
from coordinator.rundir import RunDir, create_invite, init_run
from coordinator.services.enrollment import Enrolled, Enroller
from coordinator.services.grpc_service import CoordinatorService, serve
from coordinator.services.pki import ca_sha256, make_pki
from node.enroll import enroll
from node.identity import Enrollment, NodeHome
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.errors import EnrollmentError, NetworkError
from protocol.invite import InviteToken, new_secret
from protocol.processes import free_port
from protocol.signing import fingerprint, public_key_pem

FIRST_FLOWER_ID = 2**63 + 11  # above int64: the ids must survive as uint64 end to end


class FakeSuperLink:
    """Stands in for ``SuperLink.register_node`` / ``unregister_node``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registered: list[tuple[bytes, str]] = []
        self.unregistered: list[int] = []
        self.next_id = FIRST_FLOWER_ID
        self.fail_next = 0  # this many calls raise, as a SuperLink that is down would
        self.delay_s = 0.0  # hold each registration open (widens race windows)
        self.repeat_id = False  # hand out the same id again (a ledger write then fails)

    def register(self, pem: bytes, name: str) -> int:
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                raise NetworkError("SuperLink RegisterNode failed: connection refused")
            self.registered.append((pem, name))
            if self.repeat_id:
                flower_id = self.next_id - 1
            else:
                flower_id, self.next_id = self.next_id, self.next_id + 1
        time.sleep(self.delay_s)
        return flower_id

    def unregister(self, flower_id: int) -> None:
        with self.lock:
            self.unregistered.append(flower_id)


@dataclass
class SpyEnroller(Enroller):
    """Counts the Enroll requests that reached the coordinator."""

    calls: list[str] = field(default_factory=list)

    def enroll(self, secret: str, public_key_pem: bytes, name: str) -> Enrolled:
        self.calls.append(name)
        return super().enroll(secret, public_key_pem, name)


@dataclass
class Coord:
    rd: RunDir
    ledger: Ledger
    link: FakeSuperLink
    enroller: SpyEnroller
    address: str
    tmp: Path

    def invite(self, institution: str = "Uni A", ttl_s: float = 3600.0) -> str:
        return create_invite(self.rd, institution, ttl_s=ttl_s)

    def home(self, name: str) -> NodeHome:
        return NodeHome(self.tmp / "nodes" / name)


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[Coord]:
    port = free_port()
    rd = init_run(tmp_path / "run", run_id="enroll-test", network_coordinator_port=port)
    cfg = rd.config()
    ledger = rd.ledger(cfg)
    link = FakeSuperLink()
    enroller = SpyEnroller(ledger, link.register, unregister=link.unregister)
    service = CoordinatorService(enroller, cfg.run.id, rd.fleet_address(cfg), rd.public_key_pem())
    server = serve(service, "127.0.0.1", port, rd.tls.server_cert.read_bytes(),
                   rd.tls.server_key.read_bytes())
    try:
        yield Coord(rd, ledger, link, enroller, f"127.0.0.1:{port}", tmp_path)
    finally:
        server.stop(grace=None).wait()
        ledger.close()


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def _invite_row(c: Coord):  # type: ignore[no-untyped-def]
    (row,) = c.ledger.invites()
    return row


# -- the happy path ---------------------------------------------------------------------


def test_enroll_pins_the_coordinator_and_records_the_node(coord: Coord) -> None:
    token = coord.invite("Uni A")
    home = coord.home("a")
    e = enroll(None, token, home, "gpu-a")  # address None: the token's own

    key_pem = public_key_pem(home.key())
    cfg = coord.rd.config()
    assert e == Enrollment(node_id=1, flower_node_id=str(FIRST_FLOWER_ID), name="gpu-a",
                           institution="Uni A", run_id="enroll-test",
                           coordinator_address=coord.address,
                           fleet_address=coord.rd.fleet_address(cfg))
    assert home.enrollment() == e
    assert home.ca_path.read_bytes() == coord.rd.tls.ca_cert.read_bytes()
    assert home.coordinator_key_path.read_bytes() == coord.rd.public_key_pem()
    assert stat.S_IMODE(home.key_path.stat().st_mode) == 0o600
    assert coord.link.registered == [(key_pem, "gpu-a")]

    (node,) = coord.ledger.nodes()
    (inst,) = coord.ledger.institutions()
    assert (node.id, node.name, node.flower_node_id) == (1, "gpu-a", str(FIRST_FLOWER_ID))
    assert node.institution_id == inst.id and inst.name == "Uni A"
    assert node.fingerprint == fingerprint(key_pem)
    assert node.public_key_pem.encode() == key_pem
    joins = [ev for ev in coord.ledger.events() if ev.kind == "join"]
    assert len(joins) == 1 and joins[0].node_id == node.id and "gpu-a" in joins[0].message
    invite = _invite_row(coord)
    assert invite.used_at is not None and invite.used_by_node_id == node.id


def test_pinned_ca_verifies_the_coordinator_afterwards(coord: Coord) -> None:
    home = coord.home("a")
    enroll(coord.address, coord.invite(), home, "gpu-a")
    creds = grpc.ssl_channel_credentials(root_certificates=home.ca_path.read_bytes())
    with grpc.secure_channel(coord.address, creds) as channel:
        reply = pb_grpc.CoordinatorStub(channel).Ping(pb.PingRequest(), timeout=10)
    assert reply.run_id == "enroll-test"


def test_two_institutions_get_consecutive_ids(coord: Coord) -> None:
    a = enroll(None, coord.invite("Uni A"), coord.home("a"), "a")
    b = enroll(None, coord.invite("Uni B"), coord.home("b"), "b")
    assert (a.node_id, b.node_id) == (1, 2)
    assert (a.institution, b.institution) == ("Uni A", "Uni B")
    assert int(b.flower_node_id) == int(a.flower_node_id) + 1


# -- refused tokens ---------------------------------------------------------------------


def test_reused_token_is_refused(coord: Coord) -> None:
    token = coord.invite()
    enroll(None, token, coord.home("a"), "a")
    with pytest.raises(EnrollmentError) as info:
        enroll(None, token, coord.home("b"), "b")
    assert "already used" in _one_line(info.value)
    assert len(coord.ledger.nodes()) == 1 and len(coord.link.registered) == 1
    assert not (coord.home("b").path / "node.json").exists()


_MISSING_FIELD = "atom1." + base64.urlsafe_b64encode(b'{"address":"127.0.0.1:1"}').decode()


@pytest.mark.parametrize("token", ["garbage", "", "atom1.", "atom1.!!!not-base64!!!",
                                   _MISSING_FIELD, "atom2." + "A" * 40])
def test_garbage_token_is_refused_before_any_traffic(coord: Coord, token: str) -> None:
    home = coord.home("a")
    with pytest.raises(EnrollmentError, match="^invalid invite token$"):
        enroll(coord.address, token, home, "a")
    assert coord.enroller.calls == [] and not home.path.exists()


def test_unknown_secret_is_refused(coord: Coord) -> None:
    real = InviteToken.decode(coord.invite())
    forged = InviteToken(real.address, new_secret(), real.ca_sha256).encode()
    with pytest.raises(EnrollmentError) as info:
        enroll(None, forged, coord.home("a"), "a")
    assert "not valid" in _one_line(info.value)
    assert coord.enroller.calls == ["a"]  # it did reach the coordinator, which said no
    assert coord.link.registered == [] and coord.ledger.nodes() == []
    assert _invite_row(coord).used_at is None


def test_expired_token_is_refused(coord: Coord) -> None:
    token = coord.invite(ttl_s=0.001)
    time.sleep(0.01)
    with pytest.raises(EnrollmentError) as info:
        enroll(None, token, coord.home("a"), "a")
    assert "expired" in _one_line(info.value)
    assert coord.link.registered == [] and _invite_row(coord).used_at is None


def test_ca_hash_mismatch_sends_nothing(coord: Coord) -> None:
    real = InviteToken.decode(coord.invite())
    other = make_pki(coord.tmp / "other-tls", ["127.0.0.1"])
    forged = InviteToken(real.address, real.secret,
                         ca_sha256(other.ca_cert.read_bytes())).encode()
    home = coord.home("a")
    with pytest.raises(EnrollmentError) as info:
        enroll(None, forged, home, "a")
    assert "CA hash mismatch" in _one_line(info.value)
    assert coord.enroller.calls == []  # the secret never left the node
    assert _invite_row(coord).used_at is None
    assert not home.ca_path.exists() and home.enrollment() is None
    # the untouched invite still works with the right pin
    assert enroll(None, real.encode(), home, "a").node_id == 1


def test_unreachable_coordinator_is_one_network_error(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # bound and closed again: nothing listens
    token = InviteToken(address, new_secret(), "ab" * 32).encode()
    start = time.monotonic()
    with pytest.raises(NetworkError) as info:
        enroll(None, token, NodeHome(tmp_path / "home"), "a")
    msg = _one_line(info.value)
    assert msg.startswith(f"cannot reach coordinator at {address}")
    assert time.monotonic() - start < 5


# -- SuperLink failures and keys ----------------------------------------------------------


def test_superlink_failure_releases_the_invite_for_a_retry(coord: Coord) -> None:
    token = coord.invite()
    home = coord.home("a")
    coord.link.fail_next = 1
    with pytest.raises(NetworkError) as info:
        enroll(None, token, home, "a")
    assert "SuperLink RegisterNode failed" in _one_line(info.value)
    assert _invite_row(coord).used_at is None
    assert coord.ledger.nodes() == []
    assert [ev for ev in coord.ledger.events() if ev.kind == "join"] == []
    assert home.enrollment() is None

    e = enroll(None, token, home, "a")  # same token, same key: now it goes through
    assert e.node_id == 1 and home.enrollment() == e
    assert _invite_row(coord).used_by_node_id == 1


def test_ledger_failure_after_registration_undoes_it(coord: Coord) -> None:
    enroll(None, coord.invite("Uni A"), coord.home("a"), "a")
    coord.link.repeat_id = True  # the next node gets the same Flower id: add_node fails
    token = coord.invite("Uni B")
    with pytest.raises(NetworkError) as info:  # LedgerError travels as UNAVAILABLE
        enroll(None, token, coord.home("b"), "b")
    assert "ledger refused the write" in _one_line(info.value)
    assert coord.link.unregistered == [FIRST_FLOWER_ID]  # the SuperLink key is withdrawn
    b_invite = [i for i in coord.ledger.invites() if i.used_by_node_id is None]
    assert len(b_invite) == 1 and b_invite[0].used_at is None  # and the token is usable
    coord.link.repeat_id = False
    again = enroll(None, token, coord.home("b"), "b")
    assert again.node_id == 2 and again.flower_node_id == str(FIRST_FLOWER_ID + 1)


def test_enroller_releases_invite_on_unexpected_register_error(coord: Coord) -> None:
    def broken(pem: bytes, name: str) -> int:
        raise RuntimeError("bug in the SuperLink client")

    token = InviteToken.decode(coord.invite())
    enroller = Enroller(coord.ledger, broken)
    home = coord.home("a")
    with pytest.raises(RuntimeError):
        enroller.enroll(token.secret, public_key_pem(home.key()), "a")
    assert _invite_row(coord).used_at is None


def test_same_key_cannot_enroll_twice(coord: Coord) -> None:
    first, second = coord.invite("Uni A"), coord.invite("Uni B")
    home = coord.home("a")
    enroll(None, first, home, "a")
    with pytest.raises(EnrollmentError) as info:
        enroll(None, second, home, "a-again")
    assert "already enrolled" in _one_line(info.value)
    # a copy of the key in another home is the same identity
    clone = coord.home("clone")
    clone.path.mkdir(parents=True)
    clone.key_path.write_bytes(home.key_path.read_bytes())
    with pytest.raises(EnrollmentError, match="already enrolled"):
        enroll(None, second, clone, "clone")
    assert len(coord.ledger.nodes()) == 1 and len(coord.link.registered) == 1
    unused = [i for i in coord.ledger.invites() if i.used_at is None]
    assert len(unused) == 1  # the refused attempts did not burn the second invite


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "tab\there"])
def test_bad_node_name_is_refused_without_burning_the_invite(coord: Coord, name: str) -> None:
    with pytest.raises(EnrollmentError, match="node name"):
        enroll(None, coord.invite(), coord.home("a"), name)
    assert _invite_row(coord).used_at is None and coord.link.registered == []


def test_one_token_two_racing_nodes_one_winner(coord: Coord) -> None:
    token = coord.invite()
    coord.link.delay_s = 0.3  # the winner is still registering while the loser redeems
    barrier = threading.Barrier(2)
    results: dict[str, Enrollment | BaseException] = {}

    def join(name: str) -> None:
        home = coord.home(name)
        home.key()  # key generation outside the race
        barrier.wait()
        try:
            results[name] = enroll(None, token, home, name)
        except BaseException as err:  # noqa: BLE001 - checked below
            results[name] = err

    threads = [threading.Thread(target=join, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    wins = [r for r in results.values() if isinstance(r, Enrollment)]
    losses = [r for r in results.values() if not isinstance(r, Enrollment)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert isinstance(losses[0], EnrollmentError) and "already used" in str(losses[0])
    assert len(coord.ledger.nodes()) == 1 and len(coord.link.registered) == 1
    assert _invite_row(coord).used_by_node_id == wins[0].node_id


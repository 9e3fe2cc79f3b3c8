"""Live mode: the TUI's numbers from a running coordinator's status service (gRPC over TLS).

Every request is signed (``protocol.status``): with the run's coordinator key the team reads
every view; with a node's key a contributor reads that node's view only, and the coordinator
refuses anything else. Views come back as JSON and are rebuilt as the same dataclasses
``LedgerSource`` reads, so the screens cannot tell the two apart. Nothing here writes.

``fetch`` polls (``GetStatus``, a request per view); ``stream`` has the coordinator push each
view as it changes (``WatchStatus``, ``tui.status_stream``), which the app prefers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.view_types import EventsView, NetworkView, NodeDetail, ProgressView, RunInfo
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.errors import (
    AtomError, ConfigError, EnrollmentError, LedgerError, NetworkError, ProtocolError,
)
from protocol.signing import load_private_key
from protocol.status import STATUS_FORMAT, TEAM, StatusQuery, sign_status_query

from .snapshot import Snapshot

if TYPE_CHECKING:
    from .status_stream import StatusStream

__all__ = ["CoordinatorSource", "parsed", "read_ca"]

_TIMEOUT_S = 10.0
_MAX_REPLY = 64 * 1024 * 1024  # a long run's node detail outgrows gRPC's 4 MB default
_NO_EVENTS = 2**62  # since_event_id past any event: the events view as a cheap run header


def read_ca(path: Path) -> bytes:
    """The CA certificate(s) to verify the coordinator with; ConfigError, one line, if not."""
    try:
        pem = path.expanduser().read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read CA certificate {path}: {err.strerror or err}") from None
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError(f"CA certificate {path} is not a PEM certificate") from None
    return pem


def _one_line(text: str) -> str:
    return " ".join(text.split())


class CoordinatorSource:
    """A coordinator's status service at ``address`` (``HOST:PORT``), over TLS with ``ca_pem``.

    ``key`` signs every request: the run's coordinator key (``node_id=None``: every view) or
    node ``node_id``'s key (that node's view only).
    """

    def __init__(self, address: str, ca_pem: bytes, key: ec.EllipticCurvePrivateKey,
                 node_id: int | None = None, *, clock: Callable[[], float] = time.time,
                 timeout: float = _TIMEOUT_S) -> None:
        self.address, self.node_id, self.clock, self.timeout = address, node_id, clock, timeout
        self.name = f"coordinator {address}"
        self._key = key
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        self._channel = grpc.secure_channel(
            address, creds, options=[("grpc.max_receive_message_length", _MAX_REPLY)])
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    @classmethod
    def from_files(cls, address: str, key: Path, ca: Path,
                   node_id: int | None = None) -> CoordinatorSource:
        """From key and CA files (ConfigError, one line, for a missing or bad file)."""
        ca_pem = read_ca(ca)
        return cls(address, ca_pem, load_private_key(key.expanduser()), node_id)

    def _request(self, view: str, node_id: int = 0, since: int = 0) -> pb.StatusRequest:
        query = StatusQuery(view=view, node_id=node_id, since_event_id=since,
                            requester_node_id=TEAM if self.node_id is None else self.node_id,
                            timestamp=self.clock())
        return pb.StatusRequest(
            view=query.view, node_id=query.node_id, since_event_id=query.since_event_id,
            requester_node_id=query.requester_node_id, timestamp=query.timestamp,
            signature=sign_status_query(query, self._key))

    def _get(self, view: str, node_id: int = 0, since: int = 0) -> tuple[float, RunInfo, Any]:
        """One signed GetStatus: the coordinator's clock, the run and the view's dict."""
        try:
            reply = self._stub.GetStatus(self._request(view, node_id, since),
                                         timeout=self.timeout)
        except grpc.RpcError as err:
            raise self.rpc_error(err) from None
        at, run, data, _ = self.parse(reply)
        return at, run, data

    def watch(self, view: str, node_id: int = 0, since: int = 0) -> Any:
        """A signed WatchStatus stream (``tui.status_stream`` reads it): an iterator of
        replies (``parse`` each) with ``cancel()``; it raises ``grpc.RpcError`` when it ends
        otherwise than by being cancelled."""
        return self._stub.WatchStatus(self._request(view, node_id, since))

    def parse(self, reply: pb.StatusReply) -> tuple[float, RunInfo, Any, bool]:
        """A reply's coordinator clock, run, view dict, and whether it is partial."""
        try:
            doc = json.loads(reply.json)
            if not isinstance(doc, dict) or doc.get("format") != STATUS_FORMAT:
                raise ProtocolError(f"not an {STATUS_FORMAT} reply")
            at = doc.get("at")
            if isinstance(at, bool) or not isinstance(at, (int, float)):
                raise ProtocolError("status reply: at must be a number")
            return (float(at), RunInfo.from_dict(doc.get("run")), doc.get("data"),
                    doc.get("partial") is True)
        except (ValueError, ProtocolError) as err:
            raise ProtocolError(f"bad status reply from {self.address}: {err}") from None

    def rpc_error(self, err: grpc.RpcError) -> AtomError:
        """The one-line error a failed status call means to the user."""
        code, detail = err.code(), _one_line(err.details() or "")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return EnrollmentError(f"the coordinator at {self.address} refused the status "
                                   f"request: {detail}")
        if code == grpc.StatusCode.NOT_FOUND:
            return LedgerError(detail)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return NetworkError(f"the coordinator at {self.address} has no status service "
                                "(an older version): open the run's ledger instead")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return NetworkError(f"cannot reach the coordinator at {self.address}: "
                                f"{detail or code.name}")
        return NetworkError(f"status request to {self.address} failed: {code.name} {detail}")

    def _detail(self, node_id: int) -> tuple[float, RunInfo, NodeDetail]:
        at, run, data = self._get("node", node_id)
        return at, run, parsed(NodeDetail, data, self.address)

    def check(self) -> None:
        """One request, so that an unreachable coordinator or a refused key fails before the
        screen opens."""
        if self.node_id is not None:
            self._detail(self.node_id)
        else:
            self._get("events", since=_NO_EVENTS)

    def check_node(self, node_id: int) -> None:
        """Raises LedgerError when there is no such node, ConfigError when this key is
        another node's, and the request's own errors (unreachable, refused)."""
        if self.node_id is not None and node_id != self.node_id:
            raise ConfigError(f"this is node {self.node_id}'s key: it reads node "
                              f"{self.node_id}'s view only")
        self._detail(node_id)

    def fetch(self, now: float, *, network: bool = True, since_event: int = 0,
              detail_node: int | None = None) -> Snapshot:
        """One poll: a request per view shown. ``at`` is the coordinator's clock (``now``, the
        viewer's, is not used: node statuses are relative to the ledger's times)."""
        if self.node_id is not None:  # a node's key: its own view, whatever was asked
            at, run, detail = self._detail(self.node_id)
            return Snapshot(at=at, run=run, detail=detail)
        detail = None if detail_node is None else self._detail(detail_node)[2]
        if not network:
            # The run header still needs the run: no events is the cheapest view that has it.
            at, run, _ = self._get("events", since=_NO_EVENTS)
            return Snapshot(at=at, run=run, detail=detail)
        at, run, net = self._get("network")
        progress = parsed(ProgressView, self._get("progress")[2], self.address)
        events = parsed(EventsView, self._get("events", since=since_event)[2], self.address)
        return Snapshot(at=at, run=run, network=parsed(NetworkView, net, self.address),
                        progress=progress, events=events, detail=detail)

    def stream(self, *, network: bool, since_event: int,
               on_snapshot: Callable[[Snapshot], None], on_error: Callable[[str], None],
               on_fallback: Callable[[], None]) -> StatusStream:
        """The views pushed as they change (``tui.status_stream``), from now on."""
        from .status_stream import StatusStream  # it builds on this module

        return StatusStream(self, network=network, since_event=since_event,
                            on_snapshot=on_snapshot, on_error=on_error, on_fallback=on_fallback)

    def close(self) -> None:
        self._channel.close()


def parsed(cls: Any, data: Any, address: str) -> Any:
    """``cls.from_dict(data)``, its error naming the coordinator."""
    try:
        return cls.from_dict(data)
    except ProtocolError as err:
        raise ProtocolError(f"bad status reply from {address}: {err}") from None

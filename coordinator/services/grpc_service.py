"""The coordinator's own gRPC service: enrollment, liveness, credit statements and receipt
proofs, status.

A thin servicer: each RPC calls one handler and domain errors map to status codes here, once.
"""

from __future__ import annotations

import json
import logging
import itertools
import secrets
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.blobstore import BlobDir, check_digest
from protocol.errors import (
    AtomError, BlobError, EnrollmentError, LedgerError, NetworkError, ProtocolError,
    VerificationError,
)
from protocol.messages import MAX_REPLY_BYTES, Kind
from protocol.status import StatusQuery

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.accounting.statements import StatementDesk
from coordinator.ledger.models import LeaseRow
from coordinator.metrics import BLOB_BYTES
from coordinator.run.reply_spool import ReplySpool, WorkSpool
from coordinator.services.peek_pace import PeekPace
from coordinator.services.enrollment import Enroller
from coordinator.services.status import AccessDenied, NoSuchNode, StatusDesk
from coordinator.services.status_watch import MAX_WATCHERS, StatusWatch, TooManyWatchers

__all__ = ["BlobService", "CoordinatorService", "add_to_server", "chunk_wire", "serve",
           "upload_limit"]

log = logging.getLogger(__name__)

# First match wins: subclasses before their bases.
_STATUS = {TooManyWatchers: grpc.StatusCode.RESOURCE_EXHAUSTED,
           AccessDenied: grpc.StatusCode.PERMISSION_DENIED,
           NoSuchNode: grpc.StatusCode.NOT_FOUND,
           EnrollmentError: grpc.StatusCode.PERMISSION_DENIED,
           NetworkError: grpc.StatusCode.UNAVAILABLE,
           LedgerError: grpc.StatusCode.UNAVAILABLE,
           VerificationError: grpc.StatusCode.UNAUTHENTICATED,
           BlobError: grpc.StatusCode.NOT_FOUND}


def _abort(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, AtomError):
        code = next((c for t, c in _STATUS.items() if isinstance(err, t)),
                    grpc.StatusCode.INVALID_ARGUMENT)
        context.abort(code, str(err))
    log.exception("internal error in coordinator service")
    context.abort(grpc.StatusCode.INTERNAL, "internal coordinator error")


class BlobService:
    """``FetchBlob``: content-addressed blobs streamed from ``self.blobs`` in chunks;
    ``PutBlob``: a node's update payload for an open train lease (``lease_open``), at most
    ``max_upload_bytes``, kept only if it matches its digest."""

    blobs: BlobDir | None
    lease_open: Callable[[str], bool] | None = None  # nonce -> an issued train lease?
    replies: ReplySpool | None = None  # SubmitReply's, for the run loop; None: refused
    reply_open: Callable[[str], bool] | None = None  # nonce -> an issued lease (any kind)?
    next_work: WorkSpool | None = None  # the run loop's leases, for NextWork; None: refused
    peek_pace: PeekPace | None = None  # how often a node may ask NextWork
    max_upload_bytes: int = 0  # 0: uploads refused
    CHUNK = 2 << 20  # bytes per message: under gRPC's 4 MiB default limit, few round trips

    def PutBlob(self, request_iterator: Iterator[pb.BlobUpload],
                context: grpc.ServicerContext) -> pb.PutBlobReply:
        part = None
        try:
            if self.blobs is None or not self.max_upload_bytes or self.lease_open is None:
                raise AccessDenied("this coordinator takes no uploads")
            first = next(request_iterator, None)
            if first is None:
                raise ProtocolError("empty upload")
            try:
                digest = check_digest(first.digest)
            except BlobError as err:
                raise ProtocolError(str(err)) from None
            if not 0 <= first.size <= self.max_upload_bytes:
                raise ProtocolError(f"an upload of {first.size} bytes is over the limit of "
                                    f"{self.max_upload_bytes}")
            if not self.lease_open(first.lease_nonce):
                raise AccessDenied("no open train lease with that nonce")
            part = self.blobs.partial(digest, tag=secrets.token_hex(8))
            n = 0
            for msg in itertools.chain([first], request_iterator):
                n += len(msg.data)
                if n > first.size:
                    raise ProtocolError(f"upload sent more than the {first.size} bytes it "
                                        "declared")
                part.append(msg.data)
            if n != first.size:
                raise ProtocolError(f"upload ended after {n} of {first.size} bytes")
            self.blobs.commit(part)
            BLOB_BYTES.labels("in").inc(n)
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            if part is not None:
                part.discard()
            _abort(context, err)
            raise
        return pb.PutBlobReply(size=n)

    def SubmitReply(self, request: pb.SubmitReplyRequest,
                    context: grpc.ServicerContext) -> pb.SubmitReplyReply:
        try:
            if self.replies is None or self.reply_open is None:
                raise AccessDenied("this coordinator takes replies through Flower only")
            if len(request.reply) > MAX_REPLY_BYTES:  # (before the ledger is asked)
                raise ProtocolError(f"a reply of {len(request.reply)} bytes is over the "
                                    f"limit of {MAX_REPLY_BYTES}")
            if not self.reply_open(request.lease_nonce):
                raise AccessDenied("no open lease with that nonce")
            self.replies.put(request.lease_nonce, request.reply)
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            _abort(context, err)
            raise
        return pb.SubmitReplyReply()

    def NextWork(self, request: pb.NextWorkRequest,
                 context: grpc.ServicerContext) -> pb.NextWorkReply:
        # No ledger read: only the node that answered lease ``after_nonce`` knows it, and the
        # loop wrote the work there for that node (what it gets is what Flower will bring)
        try:
            if self.next_work is None or self.peek_pace is None:
                raise AccessDenied("this coordinator sends work through Flower only")
            work = self.next_work.get(request.after_nonce)
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            _abort(context, err)
            raise
        return pb.NextWorkReply(work=work or b"",
                                retry_after_s=self.peek_pace.retry_after(request.after_nonce))

    def FetchBlob(self, request: pb.FetchBlobRequest,
                  context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            if self.blobs is None:
                raise BlobError("this coordinator serves no blobs")
            try:
                digest = check_digest(request.digest)
            except BlobError as err:
                raise ProtocolError(str(err)) from None
            size = self.blobs.size(digest)
            if not 0 <= request.offset <= size:
                raise ProtocolError(f"offset {request.offset} is outside blob {digest[:12]} "
                                    f"of {size} bytes")
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            _abort(context, err)
            raise
        offset = request.offset
        if offset == size:  # nothing left (or an empty blob): still say how big it is
            yield chunk_wire(size, offset, b"")
        for chunk in self.blobs.chunks(digest, offset, self.CHUNK):
            yield chunk_wire(size, offset, chunk)
            offset += len(chunk)
            BLOB_BYTES.labels("out").inc(len(chunk))


_DATA_TAG = b"\x1a"  # BlobChunk field 3 (data), length-delimited


def chunk_wire(size: int, offset: int, data: bytes) -> bytes:
    """A ``BlobChunk``'s wire bytes with ``data`` copied once. Built as a message, a 2 MiB
    chunk is copied into it and again when it is serialized (a 400 MB fetch from a server
    process: median 368 MB/s with those copies, 530 without; docs/performance.md)."""
    head = pb.BlobChunk(size=size, offset=offset).SerializeToString()
    n, length = len(data), bytearray()
    while n > 0x7F:  # protobuf's base-128 varint
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return b"".join((head, _DATA_TAG, length, data))


def add_to_server(service: pb_grpc.CoordinatorServicer, server: grpc.Server) -> None:
    """The generated registration, but ``FetchBlob``'s chunks go out as the wire bytes
    ``chunk_wire`` built (the generated handler would serialize a ``BlobChunk``)."""

    class Capture:  # takes what the generated code registers
        def add_generic_rpc_handlers(self, _handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
            self.name, self.handlers = name, handlers

    capture = Capture()
    pb_grpc.add_CoordinatorServicer_to_server(service, capture)
    if not hasattr(capture, "handlers"):  # regenerated by a grpc_tools that registers otherwise
        raise RuntimeError("protocol/coordinator_pb2_grpc.py no longer registers its handlers "
                           "with add_registered_method_handlers: update add_to_server")
    handlers = dict(capture.handlers)
    handlers["FetchBlob"] = grpc.unary_stream_rpc_method_handler(
        service.FetchBlob, request_deserializer=pb.FetchBlobRequest.FromString,
        response_serializer=bytes)  # already bytes: bytes(b) is b, no copy
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)


@dataclass
class CoordinatorService(BlobService, pb_grpc.CoordinatorServicer):
    enroller: Enroller
    run_id: str
    fleet_address: str
    coordinator_public_key_pem: bytes
    issuer: ReceiptIssuer | None = None  # the coordinator key: without it, no statements
    statements: StatementDesk | None = None  # default: over the enroller's ledger
    status: StatusDesk | None = None  # default: over the enroller's ledger
    blobs: BlobDir | None = None  # model versions and data shards, by digest
    replies: ReplySpool | None = None  # replies handed in beside Flower
    next_work: WorkSpool | None = None  # leases issued, for nodes to take beside Flower
    peek_pace: PeekPace | None = None  # default: 400 peeks a second at most
    max_upload_bytes: int = 0  # an update payload's bound (``upload_limit``); 0: none taken
    watch: StatusWatch | None = None  # default: over the status desk

    def __post_init__(self) -> None:
        self.lease_open = self._train_lease_open
        self.reply_open = self._lease_issued
        if self.peek_pace is None:
            self.peek_pace = PeekPace()
        if self.statements is None and self.issuer is not None:
            self.statements = StatementDesk(self.enroller.ledger, self.run_id, self.issuer)
        if self.status is None:
            self.status = StatusDesk(self.enroller.ledger, self.run_id,
                                     self.coordinator_public_key_pem)
        if self.watch is None:
            self.watch = StatusWatch(self.status)

    def close(self) -> None:
        """End the status streams now (before the server stops, which would wait for them)."""
        assert self.watch is not None
        self.watch.close()

    def _issued(self, nonce: str) -> LeaseRow | None:
        lease = self.enroller.ledger.lease_by_nonce(nonce)
        return lease if lease is not None and lease.status == "issued" else None

    def _train_lease_open(self, nonce: str) -> bool:
        lease = self._issued(nonce)
        return lease is not None and lease.kind == Kind.TRAIN

    def _lease_issued(self, nonce: str) -> bool:
        return self._issued(nonce) is not None

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollReply:
        try:
            e = self.enroller.enroll(request.secret, request.public_key_pem, request.name)
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            _abort(context, err)
            raise  # unreachable: abort raises
        return pb.EnrollReply(node_id=e.node_id, flower_node_id=e.flower_node_id,
                              institution=e.institution, run_id=self.run_id,
                              fleet_address=self.fleet_address,
                              coordinator_public_key_pem=self.coordinator_public_key_pem)

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        try:
            latest = self.enroller.ledger.latest_version()
        except Exception as err:  # noqa: BLE001
            _abort(context, err)
            raise
        return pb.PingReply(run_id=self.run_id, version=latest.version if latest else 0)

    def GetCreditStatement(self, request: pb.StatementRequest,
                           context: grpc.ServicerContext) -> pb.StatementReply:
        try:
            if self.statements is None:
                raise NetworkError("this coordinator service hands out no credit statements")
            statement = self.statements.statement(request.node_id, request.timestamp,
                                                  request.signature)
        except Exception as err:  # noqa: BLE001
            _abort(context, err)
            raise
        return pb.StatementReply(statement_json=statement.to_json())

    def GetReceiptProofs(self, request: pb.StatementRequest,
                         context: grpc.ServicerContext) -> pb.ReceiptProofReply:
        try:
            if self.statements is None:
                raise NetworkError("this coordinator service hands out no receipt proofs")
            signed, proofs = self.statements.receipt_proofs(request.node_id, request.timestamp,
                                                            request.signature)
        except Exception as err:  # noqa: BLE001
            _abort(context, err)
            raise
        head = signed.head
        return pb.ReceiptProofReply(
            tree_head=pb.SignedTreeHead(run_id=head.run_id, tree_size=head.tree_size,
                                        root=head.root, issued_at=head.issued_at,
                                        signature=signed.signature),
            proofs=[pb.ReceiptProof(receipt_json=json.dumps(p.signed.to_dict(), sort_keys=True),
                                    leaf_index=p.leaf_index, audit_path=list(p.audit_path))
                    for p in proofs])

    def GetStatus(self, request: pb.StatusRequest,
                  context: grpc.ServicerContext) -> pb.StatusReply:
        try:
            assert self.status is not None
            text = self.status.status(_status_query(request), request.signature)
        except Exception as err:  # noqa: BLE001
            _abort(context, err)
            raise
        return pb.StatusReply(json=text)

    def WatchStatus(self, request: pb.StatusRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.StatusReply]:
        try:
            assert self.watch is not None
            watcher = self.watch.open(_status_query(request), request.signature,
                                      context.is_active)
        except Exception as err:  # noqa: BLE001
            _abort(context, err)
            raise
        context.add_callback(watcher.close)  # the client went away: wake it up to end
        try:
            for text in watcher:
                yield pb.StatusReply(json=text)
        except Exception as err:  # noqa: BLE001 - a ledger read failed: the client retries
            _abort(context, err)
            raise
        finally:
            watcher.close()


def _status_query(request: pb.StatusRequest) -> StatusQuery:
    return StatusQuery(view=request.view, node_id=request.node_id,
                       since_event_id=request.since_event_id,
                       requester_node_id=request.requester_node_id,
                       timestamp=request.timestamp)


def upload_limit(n_params: int, scheme: str) -> int:
    """The largest update payload a run can produce: every value as fp32 (none), one byte
    plus scales (int8), or index + value (topk at fraction 1), plus room for the names."""
    per_value = {"none": 4, "int8": 2, "topk": 8}[scheme]
    return n_params * per_value + (1 << 20)


def serve(service: CoordinatorService, host: str, port: int, cert_chain: bytes,
          key: bytes) -> grpc.Server:
    # a status stream holds a thread while it waits: room for all of them besides the rest
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8 + MAX_WATCHERS))
    add_to_server(service, server)
    creds = grpc.ssl_server_credentials([(key, cert_chain)])
    bound = server.add_secure_port(f"{host}:{port}", creds)
    if bound == 0:
        raise NetworkError(f"cannot listen on {host}:{port} (port in use?)")
    server.start()
    return server

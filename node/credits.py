"""``atom-node credits``: fetch this node's statement, verify every receipt, sum it up.

Trust comes from what the node pinned at join, never from the statement itself: the TLS
channel is verified with ``ca.pem`` and every receipt with ``coordinator.pem`` (or a key the
user names). One receipt that does not verify fails the whole statement; nothing of it is
shown as valid.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.errors import (
    AtomError, ConfigError, EnrollmentError, NetworkError, ProtocolError, VerificationError,
)
from protocol.receipts import (
    PENALTY, Receipt, Statement, statement_request_bytes, verify_receipt,
)
from protocol.messages import Kind
from protocol.signing import fingerprint, load_private_key, load_public_key, sign

from .identity import NodeHome

__all__ = ["BadReceipt", "CreditReport", "ask_coordinator", "coordinator_key", "credits_report",
           "fetch_statement", "verify_statement"]

_TIMEOUT_S = 30.0
_MAX_REPLY = 256 * 1024 * 1024  # a long run's statement outgrows gRPC's 4 MB default


class BadReceipt(VerificationError):
    """One receipt of a statement failed: the message names it by its update."""

    def __init__(self, update_id: object, reason: str, why: str = "does not verify") -> None:
        self.reason = reason
        AtomError.__init__(self, f"receipt for update {update_id} {why}: {reason}")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None


def coordinator_key(home: NodeHome, explicit: Path | None = None) -> bytes:
    """The PEM receipts are checked against: ``explicit`` or the one pinned at join."""
    path = explicit or home.coordinator_key_path
    if explicit is None and not path.exists():
        raise ConfigError(f"no coordinator key pinned in {home.path} (the node has not "
                          "joined): pass --coordinator-key PEM")
    pem = _read(path, "coordinator key")
    try:
        load_public_key(pem)
    except ProtocolError:
        raise ConfigError(f"coordinator key {path} is not a PEM EC public key") from None
    return pem


def _rpc_error(address: str, err: grpc.RpcError, what: str) -> AtomError:
    code, detail = err.code(), (err.details() or "").strip()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EnrollmentError(f"coordinator refused the {what} request: {detail}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        served = "credit statements" if what == "statement" else what
        return NetworkError(f"coordinator at {address} does not serve {served}")
    return NetworkError(f"cannot get the {what} from {address}: {detail or code.name}")


def ask_coordinator(home: NodeHome, rpc: str, what: str, *,
                    clock: Callable[[], float] = time.time,
                    timeout: float = _TIMEOUT_S) -> tuple[int, Any]:
    """``(node id, reply)`` of the coordinator's ``rpc`` asked with this node's signed
    statement request, over TLS with the pinned CA (``what`` names it in errors)."""
    e = home.enrollment()
    if e is None:
        raise EnrollmentError(f"no enrollment in {home.path}: run `atom-node join` first")
    ca = _read(home.ca_path, "pinned CA")
    key = load_private_key(home.key_path)
    ts = clock()
    request = pb.StatementRequest(node_id=e.node_id, timestamp=ts,
                                  signature=sign(key, statement_request_bytes(e.node_id, ts)))
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.max_receive_message_length", _MAX_REPLY)]
    with grpc.secure_channel(e.coordinator_address, creds, options=options) as channel:
        try:
            call = getattr(pb_grpc.CoordinatorStub(channel), rpc)
            return e.node_id, call(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _rpc_error(e.coordinator_address, err, what) from None


def fetch_statement(home: NodeHome, *, clock: Callable[[], float] = time.time,
                    timeout: float = _TIMEOUT_S) -> Statement:
    """Ask the coordinator (over TLS with the pinned CA) for this node's own statement."""
    node_id, reply = ask_coordinator(home, "GetCreditStatement", "statement", clock=clock,
                                     timeout=timeout)
    statement = Statement.from_json(reply.statement_json)
    if statement.node_id != node_id:
        raise VerificationError("wrong_node", f"the coordinator sent the statement of node "
                                f"{statement.node_id}, this is node {node_id}")
    return statement


def verify_statement(statement: Statement, coordinator_pem: bytes, node_id: int
                     ) -> list[Receipt]:
    """Every receipt, verified for ``node_id`` (the first bad one raises ``BadReceipt``),
    then the coordinator's seal over all of them: a statement missing a receipt it was
    issued with (a penalty, say) does not verify."""
    seen: set[int] = set()
    out = []
    for signed in statement.receipts:
        update_id = getattr(signed.receipt, "update_id", "?")
        try:
            verify_receipt(signed, coordinator_pem, node_id)
        except VerificationError as err:
            raise BadReceipt(update_id, err.reason) from None
        if update_id in seen:  # counted twice would pay twice
            raise BadReceipt(update_id, "duplicate", "appears twice")
        seen.add(update_id)
        out.append(signed.receipt)
    if not statement.seal_verifies(coordinator_pem):
        raise VerificationError(
            "bad_seal", f"the statement's seal does not verify with coordinator key "
            f"{fingerprint(coordinator_pem)}: receipts were removed, added or reordered")
    return out


@dataclass(frozen=True)
class CreditLine:
    """Credits of one kind of work in one run."""

    run_id: str
    kind: str
    updates: int
    tokens: int
    credits: float


@dataclass(frozen=True)
class CreditTotal:
    updates: int  # accepted updates paid
    tokens_trained: int
    tokens_evaluated: int
    penalties: int  # updates that lost a spot or eval check and were charged
    credits: float  # net of penalties


def _total(receipts: Iterable[Receipt]) -> CreditTotal:
    rs = list(receipts)
    penalties = sum(r.kind == PENALTY for r in rs)
    return CreditTotal(
        updates=len(rs) - penalties, tokens_trained=sum(r.tokens for r in rs if r.kind == Kind.TRAIN),
        tokens_evaluated=sum(r.tokens for r in rs if r.kind in (Kind.EVAL, Kind.TASKS)),
        penalties=penalties,
        credits=round(math.fsum(float(r.amount) for r in rs), 6))


@dataclass(frozen=True)
class CreditReport:
    """A verified statement summed per run and kind of work, and in total."""

    node_id: int
    coordinator_key_fingerprint: str
    lines: list[CreditLine]
    runs: dict[str, CreditTotal]
    total: CreditTotal
    receipts_verified: int

    @classmethod
    def of(cls, node_id: int, receipts: list[Receipt], coordinator_pem: bytes) -> CreditReport:
        order = {"train": 0, "eval": 1, PENALTY: 2}
        keys = sorted({(r.run_id, r.kind) for r in receipts},
                      key=lambda k: (k[0], order.get(k[1], 2), k[1]))
        lines = []
        for run_id, kind in keys:
            rs = [r for r in receipts if (r.run_id, r.kind) == (run_id, kind)]
            lines.append(CreditLine(run_id, kind, len(rs), sum(r.tokens for r in rs),
                                    round(math.fsum(float(r.amount) for r in rs), 6)))
        runs = {run: _total(r for r in receipts if r.run_id == run)
                for run in sorted({r.run_id for r in receipts})}
        return cls(node_id, fingerprint(coordinator_pem), lines, runs, _total(receipts),
                   len(receipts))

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id,
                "coordinator_key_fingerprint": self.coordinator_key_fingerprint,
                "receipts_verified": self.receipts_verified,
                "by_kind": [asdict(line) for line in self.lines],
                "runs": [{"run_id": run, **asdict(t)} for run, t in self.runs.items()],
                "total": asdict(self.total)}


def _save(statement: Statement, path: Path) -> None:
    path = path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(statement.to_json() + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"cannot save the statement to {path}: {err.strerror or err}") from None


def credits_report(home: NodeHome, *, statement_file: Path | None = None,
                   key_file: Path | None = None, save: Path | None = None,
                   clock: Callable[[], float] = time.time) -> CreditReport:
    """Fetch (or read ``statement_file``), verify every receipt, save if asked, sum up.

    Offline (``statement_file``) the receipts must all be for the statement's own node;
    online they must be for this node.
    """
    pem = coordinator_key(home, key_file)
    if statement_file is not None:
        text = _read(statement_file, "statement")
        try:
            statement = Statement.from_json(text)
        except ProtocolError as err:
            raise ProtocolError(f"{statement_file}: {err}") from None
    else:
        statement = fetch_statement(home, clock=clock)
    receipts = verify_statement(statement, pem, statement.node_id)
    if save is not None:
        _save(statement, save)  # only once every receipt verified
    return CreditReport.of(statement.node_id, receipts, pem)

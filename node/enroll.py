"""First contact with a coordinator: pin its CA from the invite, then enroll over gRPC.

The invite carries only the SHA-256 of the coordinator's CA certificate. The coordinator's TLS
server presents its chain (leaf + CA); we read that chain without trusting it, keep the
certificate whose hash matches the pin, and only then open a verified gRPC channel with it.
"""

from __future__ import annotations

import hashlib
import socket
import ssl

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.errors import EnrollmentError, NetworkError
from protocol.invite import InviteToken
from protocol.signing import public_key_pem

from .identity import Enrollment, NodeHome

__all__ = ["fetch_pinned_ca", "enroll", "split_address"]

_TIMEOUT_S = 15.0


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NetworkError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def fetch_pinned_ca(address: str, ca_sha256: str, timeout: float = _TIMEOUT_S) -> bytes:
    """Return the PEM of the CA in the server's chain whose DER SHA-256 is ``ca_sha256``."""
    host, port = split_address(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted yet: the pin decides below
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                # CPython 3.10+ exposes the presented chain only on the private object.
                chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[union-attr]
                ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError) as err:
        raise NetworkError(f"cannot reach coordinator at {address}: {err}") from None
    for der in ders:
        if hashlib.sha256(der).hexdigest() == ca_sha256.lower():
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    raise EnrollmentError(
        f"coordinator at {address} does not present the CA pinned by the invite "
        "(CA hash mismatch): refusing to enroll")


def _rpc_error(address: str, err: grpc.RpcError) -> Exception:
    code, detail = err.code(), (err.details() or "").splitlines()[0] if err.details() else ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NetworkError(f"cannot reach coordinator at {address}: {detail or code.name}")
    return EnrollmentError(detail or f"enrollment refused ({code.name})")


def enroll(address: str | None, token: str, home: NodeHome, name: str) -> Enrollment:
    """Enroll this node with the coordinator named by ``address`` (or the token's)."""
    invite = InviteToken.decode(token)
    address = address or invite.address
    ca_pem = fetch_pinned_ca(address, invite.ca_sha256)
    key = home.key()
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(address, creds) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        try:
            reply = stub.Enroll(pb.EnrollRequest(secret=invite.secret, name=name,
                                                 public_key_pem=public_key_pem(key)),
                                timeout=_TIMEOUT_S)
        except grpc.RpcError as err:
            raise _rpc_error(address, err) from None
    enrollment = Enrollment(node_id=reply.node_id, flower_node_id=reply.flower_node_id,
                            name=name, institution=reply.institution, run_id=reply.run_id,
                            coordinator_address=address, fleet_address=reply.fleet_address)
    home.save_enrollment(enrollment, ca_pem, reply.coordinator_public_key_pem)
    return enrollment

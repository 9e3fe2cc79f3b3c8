r"""Status requests: what ``atom-tui`` signs to read a view of a running coordinator.

What is signed — ``status_request_bytes(query)`` is the only definition::

    b"atom-status-request-v1\n" + json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=True, allow_nan=False)
    doc = {"node_id": int, "requester_node_id": int, "since_event_id": int,
           "timestamp": float, "view": str}

``requester_node_id`` 0 is the coordinator team, who sign with the run's coordinator key and
may read every view; any other value is a node, who signs with its registered key and may read
only its own ``node`` view. The coordinator honours a request within ±5 minutes of its clock.

The reply (``StatusReply.json``) is ``{"format": "atom-status-v1", "view", "at", "run",
"data"}``: ``at`` the coordinator's clock, ``run`` the ``RunInfo`` and ``data`` the view itself,
both as ``dataclasses.asdict`` writes them (see ``coordinator.services.views``).

``WatchStatus`` takes the same signed request and streams replies: the view at once, then one
each time it changes. An ``events`` reply holds the events newer than the previous one's
``last_id``; a ``network`` reply after the first carries ``"partial": true`` and only the node
rows that changed since the previous reply (nodes are never removed; the header is whole);
``progress`` and ``node`` replies are whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import ProtocolError
from protocol.signing import sign

__all__ = ["STATUS_FORMAT", "STATUS_REQUEST_PREFIX", "TEAM", "VIEWS", "StatusQuery",
           "sign_status_query", "status_request_bytes"]

STATUS_REQUEST_PREFIX = b"atom-status-request-v1\n"
STATUS_FORMAT = "atom-status-v1"
VIEWS = ("network", "progress", "events", "node")
TEAM = 0  # requester_node_id of the coordinator team


@dataclass(frozen=True)
class StatusQuery:
    """One status request, without its signature."""

    view: str
    node_id: int = 0
    since_event_id: int = 0
    requester_node_id: int = TEAM
    timestamp: float = 0.0


def status_request_bytes(query: StatusQuery) -> bytes:
    """The exact bytes the requester signs (types checked; ProtocolError otherwise)."""
    if not isinstance(query.view, str):
        raise ProtocolError("status request: view must be a string")
    for name in ("node_id", "since_event_id", "requester_node_id"):
        value = getattr(query, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"status request: {name} must be an int")
    if isinstance(query.timestamp, bool) or not isinstance(query.timestamp, (int, float)) \
            or not math.isfinite(query.timestamp):
        raise ProtocolError("status request: timestamp must be a finite number")
    doc = {"view": query.view, "node_id": query.node_id, "since_event_id": query.since_event_id,
           "requester_node_id": query.requester_node_id, "timestamp": float(query.timestamp)}
    return STATUS_REQUEST_PREFIX + json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
        allow_nan=False).encode("ascii")


def sign_status_query(query: StatusQuery, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The requester's signature (ECDSA-SHA256, DER) over ``status_request_bytes``."""
    return sign(key, status_request_bytes(query))

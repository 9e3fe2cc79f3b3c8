"""The status service's desk: who may read which view of the run, and the view as JSON.

A request is signed (``protocol.status.status_request_bytes``) either by the run's coordinator
key — the coordinator team, every view — or by an enrolled node's key, which reads its own
``node`` view only: a contributor sees no other node's name, numbers or events. Requests are
honoured within ``WINDOW_S`` of the coordinator's clock. Views are computed at the
coordinator's clock, read-only, through ``coordinator.services.views``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import LedgerError, ProtocolError, Reason, VerificationError
from protocol.signing import verify
from protocol.status import STATUS_FORMAT, TEAM, VIEWS, StatusQuery, status_request_bytes

from coordinator.accounting.statements import CLOCK_SKEW, WINDOW_S
from coordinator.ledger.reads import LedgerReads
from coordinator.services.views import events_view, network_view, node_detail, progress_view, run_info

__all__ = ["AccessDenied", "NoSuchNode", "StatusDesk"]


class AccessDenied(VerificationError):
    """An authenticated requester asked for a view it may not read (PERMISSION_DENIED)."""

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


class NoSuchNode(LedgerError):
    """The team asked for the view of a node the ledger does not have (NOT_FOUND)."""


@dataclass
class StatusDesk:
    ledger: LedgerReads
    run_id: str | None
    coordinator_public_key_pem: bytes
    clock: Callable[[], float] = time.time
    window_s: float = WINDOW_S

    def authorise(self, query: StatusQuery, signature: bytes) -> None:
        """Returns if ``signature`` is the requester's and the requester may read the view.

        Raises
        ------
        VerificationError
            ``unknown_node``, ``clock_skew``, ``malformed`` or ``bad_signature``.
        AccessDenied
            A node asked for anything but its own node view.
        """
        if query.requester_node_id == TEAM:
            key, who = self.coordinator_public_key_pem, "the coordinator's key"
        else:
            node = self.ledger.node(query.requester_node_id)
            if node is None:
                raise VerificationError(Reason.UNKNOWN_NODE,
                                        f"no node {query.requester_node_id} is enrolled")
            key, who = node.public_key_pem.encode(), f"node {query.requester_node_id}'s key"
        skew = self.clock() - query.timestamp
        if not math.isfinite(skew) or abs(skew) > self.window_s:
            raise VerificationError(CLOCK_SKEW, f"request timestamp is {skew:+.0f} s off the "
                                    f"coordinator's clock (allowed ±{self.window_s:.0f} s)")
        try:
            data = status_request_bytes(query)
        except ProtocolError as err:
            raise VerificationError(Reason.MALFORMED, str(err)) from None
        if not verify(key, data, signature):
            raise VerificationError(Reason.BAD_SIGNATURE, f"request is not signed by {who}")
        if query.requester_node_id != TEAM and (
                query.view != "node" or query.node_id != query.requester_node_id):
            raise AccessDenied(f"node {query.requester_node_id} may read its own node view "
                               "only (the network's views need the coordinator's key)")

    def status(self, query: StatusQuery, signature: bytes) -> str:
        """The requested view as the reply's JSON, once :meth:`authorise` let it through.

        Raises ProtocolError for an unknown view and NoSuchNode for an unknown node.
        """
        self.authorise(query, signature)
        if query.view not in VIEWS:
            raise ProtocolError(f"unknown view {query.view!r} (one of {', '.join(VIEWS)})")
        now = self.clock()
        data: Any
        if query.view == "network":
            net = network_view(self.ledger, now, self.run_id)
            run, data = net.header.run, net
        else:
            run = run_info(self.ledger, self.run_id)
            if query.view == "progress":
                data = progress_view(self.ledger)
            elif query.view == "events":
                data = events_view(self.ledger, max(query.since_event_id, 0))
            elif self.ledger.node(query.node_id) is None:
                raise NoSuchNode(f"no node {query.node_id} in the ledger")
            else:
                data = node_detail(self.ledger, query.node_id, now)
        return json.dumps({"format": STATUS_FORMAT, "view": query.view, "at": now,
                           "run": dataclasses.asdict(run), "data": dataclasses.asdict(data)},
                          separators=(",", ":"))

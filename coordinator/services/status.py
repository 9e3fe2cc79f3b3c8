"""The status service's desk: who may read which view of the run, and the view as JSON.

A request is signed (``protocol.status.status_request_bytes``) either by the run's coordinator
key — the coordinator team, every view — or by an enrolled node's key, which reads its own
``node`` view only: a contributor sees no other node's name, numbers or events. Requests are
honoured within ``WINDOW_S`` of the coordinator's clock. Views are computed at the
coordinator's clock, read-only, through ``coordinator.services.views``, and kept in one
``ViewCache`` shared by every request and stream (recomputed only when the ledger changed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import LedgerError, ProtocolError, Reason, VerificationError
from protocol.signing import verify
from protocol.status import STATUS_FORMAT, TEAM, VIEWS, StatusQuery, status_request_bytes

from coordinator.accounting.statements import CLOCK_SKEW, WINDOW_S
from coordinator.ledger.reads import LedgerReads
from coordinator.services.view_cache import ViewCache

__all__ = ["AccessDenied", "NoSuchNode", "StatusDesk", "reply_json"]


class AccessDenied(VerificationError):
    """An authenticated requester asked for a view it may not read (PERMISSION_DENIED)."""

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


class NoSuchNode(LedgerError):
    """The team asked for the view of a node the ledger does not have (NOT_FOUND)."""


def reply_json(view: str, at: float, run: Any, data: Any, *, partial: bool = False) -> str:
    """A status reply (``protocol.status``): ``run`` and ``data`` are view dataclasses."""
    doc = {"format": STATUS_FORMAT, "view": view, "at": at, "run": dataclasses.asdict(run),
           "data": dataclasses.asdict(data)}
    if partial:
        doc["partial"] = True
    return json.dumps(doc, separators=(",", ":"))


@dataclass
class StatusDesk:
    ledger: LedgerReads
    run_id: str | None
    coordinator_public_key_pem: bytes
    clock: Callable[[], float] = time.time
    window_s: float = WINDOW_S
    # shared by every request and stream: views recomputed only when the ledger changed
    views: ViewCache = field(init=False)

    def __post_init__(self) -> None:
        self.views = ViewCache(self.ledger, self.run_id)

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

    def admit(self, query: StatusQuery, signature: bytes) -> None:
        """:meth:`authorise`, then that the view can be answered at all.

        Raises ProtocolError for an unknown view and NoSuchNode for an unknown node.
        """
        self.authorise(query, signature)
        if query.view not in VIEWS:
            raise ProtocolError(f"unknown view {query.view!r} (one of {', '.join(VIEWS)})")
        if query.view == "node" and self.ledger.node(query.node_id) is None:
            raise NoSuchNode(f"no node {query.node_id} in the ledger")

    def status(self, query: StatusQuery, signature: bytes) -> str:
        """The requested view as the reply's JSON, once :meth:`admit` let it through."""
        self.admit(query, signature)
        self.views.refresh()
        now = self.clock()
        data: Any
        if query.view == "network":
            net = self.views.network(now)
            run, data = net.header.run, dataclasses.replace(net, at=now)
        else:
            run = self.views.run(now)
            if query.view == "progress":
                data = self.views.progress(now)
            elif query.view == "events":
                data = self.views.events(max(query.since_event_id, 0))
            else:
                data = self.views.node(query.node_id, now)
        return reply_json(query.view, now, run, data)

"""What passes beside Flower between the coordinator's service and its run loop: replies in
(``ReplySpool``) and, the other way, the next work of each node (``WorkSpool``).

A node's reply travels back through Flower (its worker, the SuperNode, the SuperLink,
the ServerApp's poll): 1.0-1.5 s on the loaded bench machine, the largest part of a lease's
overhead once the next lease is queued (docs/performance.md), and in lock-step rounds part
of every round's barrier. A train lease's node has just uploaded the payload to the gRPC
service, so it hands the same reply bytes over there too (``SubmitReply``; an evaluation's
as well: a signed record and its per-window losses). The service
(its own process) puts them here, one file per lease nonce, and the run loop takes them on
its next poll (``SpooledTransport``); Flower's copy, when it comes, is dropped.

Nothing here is trusted more than a Flower reply: the service takes a reply only for an
issued lease's nonce (a secret of that lease's node), and the run loop screens it the same
way (the node's signature over the lease, the payload's or the arrays' digest).

Work goes out the same way, for the same reason: Flower takes 0.5-0.8 s to bring a lease to
its node on the loaded bench machine, and in lock-step rounds every node waits that long at
every barrier. When the loop sends a node a lease it also writes the lease's content here,
named by the nonce of the lease it sent that node before (``SpooledTransport``); the node,
which answered that one, asks the service for "the work after <nonce>" (``NextWork``) until
it gets it or Flower's copy comes. The nonce is the capability, as for replies.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from protocol._fields import NONCE
from protocol.errors import BlobError, ProtocolError
from protocol.messages import MAX_REPLY_BYTES

__all__ = ["ReplySpool", "WorkSpool"]

_STALE_S = 3600.0  # a reply no loop took (its lease expired, a restart): swept after this


class ReplySpool:
    """One directory of ``<nonce>`` files, written atomically (a reader never sees half)."""

    _WHAT = "reply"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobError(f"reply spool {self.root}: {exc.strerror or exc}") from None

    def _path(self, nonce: str) -> Path:
        """Where lease ``nonce``'s file goes; a nonce that is not one never names a path."""
        if NONCE.fullmatch(nonce) is None:
            raise ProtocolError(f"{self._WHAT}: the lease nonce must be 32 lowercase hex")
        return self.root / nonce

    def put(self, nonce: str, data: bytes) -> None:
        """Keep ``data`` under lease ``nonce`` (a later one replaces it)."""
        path = self._path(nonce)
        if len(data) > MAX_REPLY_BYTES:
            raise ProtocolError(f"{self._WHAT} of {len(data)} bytes is over the limit of "
                                f"{MAX_REPLY_BYTES}")
        tmp = self.root / f".{nonce}.{secrets.token_hex(4)}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BlobError(f"{self._WHAT} spool: {exc.strerror or exc}") from None

    def take(self, nonces: Iterable[str]) -> dict[str, bytes]:
        """The replies waiting for any of ``nonces``, removed from the spool."""
        wanted = set(nonces)
        try:
            here = [name for name in os.listdir(self.root) if name in wanted]
        except OSError:
            return {}
        out = {}
        for name in here:
            path = self.root / name
            try:
                out[name] = path.read_bytes()
                path.unlink()
            except OSError:
                continue  # (read next time, or Flower's copy answers)
        return out

    def sweep(self, older_than_s: float = _STALE_S) -> int:
        """Remove what has waited longer than ``older_than_s``; how many."""
        cutoff, gone = time.time() - older_than_s, 0
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    gone += 1
            except OSError:
                continue
        return gone


class WorkSpool(ReplySpool):
    """The work the run loop issued to a node, under the nonce of the lease it issued that
    node before: read (not taken) by the service, removed by the loop once the lease is
    answered or given up."""

    _WHAT = "next work"

    def get(self, after_nonce: str) -> bytes | None:
        """The work issued after lease ``after_nonce``, None if there is none (yet)."""
        path = self._path(after_nonce)
        try:
            return path.read_bytes()
        except OSError:
            return None

    def drop(self, nonce: str) -> None:
        try:
            (self.root / nonce).unlink(missing_ok=True)
        except OSError:
            pass  # (swept later)

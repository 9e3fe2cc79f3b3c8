"""Replies handed in beside Flower: from the coordinator's service to its run loop.

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

__all__ = ["ReplySpool"]

_STALE_S = 3600.0  # a reply no loop took (its lease expired, a restart): swept after this


class ReplySpool:
    """One directory of ``<nonce>`` files, written atomically (a reader never sees half)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobError(f"reply spool {self.root}: {exc.strerror or exc}") from None

    def put(self, nonce: str, data: bytes) -> None:
        """Keep ``data`` as the reply to lease ``nonce`` (a later one replaces it)."""
        if NONCE.fullmatch(nonce) is None:
            raise ProtocolError("reply: the lease nonce must be 32 lowercase hex")
        if len(data) > MAX_REPLY_BYTES:
            raise ProtocolError(f"reply of {len(data)} bytes is over the limit of "
                                f"{MAX_REPLY_BYTES}")
        tmp = self.root / f".{nonce}.{secrets.token_hex(4)}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.root / nonce)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BlobError(f"reply spool: {exc.strerror or exc}") from None

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

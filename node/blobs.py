"""Getting the blobs a lease names: the node's cache first, then mirrors, then the coordinator.

Every blob is named by the SHA-256 of its bytes and lands in the cache only through
``BlobDir.commit``, which checks that digest, so a mirror need not be trusted: one that
serves wrong bytes costs a retry from the next source, never a corrupt model. Sizes are
checked against ``max_bytes`` before a byte is stored (the coordinator says the size in its
first chunk; a mirror in ``Content-Length``, and it is cut off if it sends more).

Sources, tried in order::

    HttpMirror(url)        GET {url}/{digest[:2]}/{digest}: any HTTP(S) server holding a copy
                           of the coordinator's DIR/blobs/ (same layout: rsync it there)
    CoordinatorBlobs(...)  the coordinator's FetchBlob stream; resumes from the last byte
                           received after a dropped connection (``RESUMES`` times)
"""

from __future__ import annotations

import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.blobstore import BlobDir, Partial, check_digest
from protocol.errors import BlobError

from . import metrics

__all__ = ["BlobFetcher", "BlobSink", "BlobSource", "CoordinatorBlobs", "HttpMirror", "Progress"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes so far, total)
_HTTP_READ = 1 << 20
_UPLOAD_CHUNK = 2 << 20
_TIMEOUT_S = 30.0


class BlobSource(Protocol):
    name: str

    def fetch(self, digest: str, into: Partial, max_bytes: int,
              progress: Progress | None) -> None:
        """Append the blob's bytes (from ``into.size`` on, where supported) to ``into``;
        ``BlobError`` if this source cannot."""


class BlobSink(Protocol):
    def put(self, digest: str, data: bytes, lease_nonce: str,
            progress: Progress | None = None) -> None:
        """Hand the coordinator an update payload for the open train lease; ``BlobError``."""

    def submit_reply(self, lease_nonce: str, reply: bytes) -> None:
        """Hand the coordinator the lease's reply beside Flower; ``BlobError``."""


def _too_big(digest: str, size: int, max_bytes: int) -> BlobError:
    return BlobError(f"blob {digest[:12]} is {size} bytes, over the limit of {max_bytes}")


@dataclass(frozen=True)
class HttpMirror:
    """An untrusted HTTP(S) mirror of a blob directory: ``{url}/{digest[:2]}/{digest}``."""

    url: str
    timeout_s: float = _TIMEOUT_S

    @property
    def name(self) -> str:
        return self.url

    def fetch(self, digest: str, into: Partial, max_bytes: int,
              progress: Progress | None) -> None:
        into.discard()  # mirrors are plain file servers: start over rather than trust Range
        try:
            with urllib.request.urlopen(f"{self.url.rstrip('/')}/{digest[:2]}/{digest}",
                                        timeout=self.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else 0
                if total > max_bytes:
                    raise _too_big(digest, total, max_bytes)
                done = 0
                while chunk := resp.read(_HTTP_READ):
                    done += len(chunk)
                    if done > max_bytes:
                        raise _too_big(digest, done, max_bytes)
                    into.append(chunk)
                    if progress is not None:
                        progress(done, total or done)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BlobError(f"{self.url}: {getattr(exc, 'reason', None) or exc}") from None


@dataclass
class CoordinatorBlobs:
    """The coordinator's ``FetchBlob`` stream over an already made (TLS) channel."""

    channel: grpc.Channel
    name: str = "coordinator"
    RESUMES: int = 3
    timeout_s: float = 600.0

    def fetch(self, digest: str, into: Partial, max_bytes: int,
              progress: Progress | None) -> None:
        stub = pb_grpc.CoordinatorStub(self.channel)
        for attempt in range(self.RESUMES + 1):
            offset = into.size
            try:
                if self._stream(stub, digest, into, offset, max_bytes, progress):
                    return
                why = "the stream ended early"
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.PERMISSION_DENIED):
                    raise BlobError(f"coordinator: {err.details()}") from None  # type: ignore[attr-defined]
                why = f"{code.name}: {err.details()}"  # type: ignore[attr-defined]
            log.info("blob %s: %s after %d bytes; resuming (%d)", digest[:12], why, into.size,
                     attempt + 1)
        raise BlobError(f"coordinator: blob {digest[:12]} still incomplete after "
                        f"{self.RESUMES} resumes ({why})")

    def put(self, digest: str, data: bytes, lease_nonce: str,
            progress: Progress | None = None) -> None:
        """Upload an update payload for the open train lease ``lease_nonce`` (retried from
        the start after a dropped connection, ``RESUMES`` times); ``BlobError`` if refused."""
        stub = pb_grpc.CoordinatorStub(self.channel)

        def chunks() -> Iterator[pb.BlobUpload]:
            yield pb.BlobUpload(digest=digest, size=len(data), lease_nonce=lease_nonce,
                                data=data[:_UPLOAD_CHUNK])
            for at in range(_UPLOAD_CHUNK, len(data), _UPLOAD_CHUNK):
                if progress is not None:
                    progress(at, len(data))
                yield pb.BlobUpload(data=data[at:at + _UPLOAD_CHUNK])

        why = ""
        for attempt in range(self.RESUMES + 1):
            try:
                stub.PutBlob(chunks(), timeout=self.timeout_s)
                if progress is not None:
                    progress(len(data), len(data))
                metrics.TRANSFER_BYTES.labels("up").inc(len(data))
                return
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                why = f"{code.name}: {err.details()}"  # type: ignore[attr-defined]
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED):
                    break
                log.info("upload of %s: %s; again (%d)", digest[:12], why, attempt + 1)
        raise BlobError(f"coordinator refused the update payload {digest[:12]}: {why}")

    def submit_reply(self, lease_nonce: str, reply: bytes) -> None:
        """Hand in the lease's reply (``content_to_bytes``) beside Flower's way back
        (coordinator/run/reply_spool.py); ``BlobError`` if refused. One try: the Flower
        reply still answers the lease."""
        try:
            pb_grpc.CoordinatorStub(self.channel).SubmitReply(
                pb.SubmitReplyRequest(lease_nonce=lease_nonce, reply=reply), timeout=10.0)
        except grpc.RpcError as err:
            raise BlobError(f"coordinator refused the reply: {err.code().name}: "  # type: ignore[attr-defined]
                            f"{err.details()}") from None  # type: ignore[attr-defined]

    def next_work(self, after_nonce: str) -> tuple[bytes, float]:
        """The work issued after lease ``after_nonce`` (empty: none yet) and when to ask
        again (``node.work_ahead``); raises ``grpc.RpcError``."""
        got = pb_grpc.CoordinatorStub(self.channel).NextWork(
            pb.NextWorkRequest(after_nonce=after_nonce), timeout=5.0)
        return got.work, got.retry_after_s

    def _stream(self, stub: pb_grpc.CoordinatorStub, digest: str, into: Partial, offset: int,
                max_bytes: int, progress: Progress | None) -> bool:
        """Append one stream's chunks; True once the whole blob is in."""
        size = -1
        stream = stub.FetchBlob(pb.FetchBlobRequest(digest=digest, offset=offset),
                                timeout=self.timeout_s)
        for chunk in _read_ahead(stream):
            data = chunk.data  # read once: each access copies the bytes out of the message
            if size < 0:
                size = chunk.size
                if size > max_bytes:
                    raise _too_big(digest, size, max_bytes)
            if chunk.size != size or chunk.offset != offset or offset + len(data) > size:
                into.discard()  # a coordinator that contradicts itself: start clean
                raise BlobError(f"coordinator: blob {digest[:12]} arrived out of order")
            into.append(data)
            offset += len(data)
            if progress is not None:
                progress(offset, size)
        return size >= 0 and offset == size


_AHEAD = 4  # chunks received ahead of the one being hashed and written (8 MiB)


def _read_ahead(stream: Any) -> Iterator[Any]:
    """``stream``'s items, received by a thread while the caller hashes and writes the one
    before (gRPC, hashlib and file writes all release the GIL: on two cores the transfer
    and the check overlap). An error of the stream is raised here, in order; a caller that
    stops early cancels the stream."""
    box: queue.Queue[Any] = queue.Queue(_AHEAD)
    end = object()

    def pump() -> None:
        try:
            for item in stream:
                box.put(item)
        except Exception as err:  # noqa: BLE001 - handed to the reader, in order
            box.put(err)
        box.put(end)

    threading.Thread(target=pump, daemon=True, name="blob-stream").start()
    try:
        while (item := box.get()) is not end:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        if item is not end:  # the reader gave up: stop the stream, let the pump finish
            if callable(cancel := getattr(stream, "cancel", None)):
                cancel()
            while box.get() is not end:
                pass


# Striped by digest: two fetches of one blob (a prefetch and the lease that needs it)
# take turns, and the second finds it cached.
_LOCKS = [threading.Lock() for _ in range(64)]


def _lock_for(digest: str) -> threading.Lock:
    return _LOCKS[int(digest[:8], 16) % len(_LOCKS)]


@dataclass
class BlobFetcher:
    """The node's way to a blob: its cache, else each source in turn."""

    cache: BlobDir
    sources: Sequence[BlobSource]
    max_bytes: int
    fetched: list[str] = field(default_factory=list)  # digests downloaded (not cache hits)

    def get(self, digest: str, progress: Progress | None = None) -> memoryview:
        """The blob's bytes (``BlobDir.view``: mapped from the cache, not read), checked
        against ``digest``; ``BlobError`` naming every source's failure if none could serve
        it."""
        check_digest(digest)
        # a lease may need the blob a prefetch is fetching: wait for it, never fetch it twice
        with _lock_for(digest):
            return self._get(digest, progress)

    def _get(self, digest: str, progress: Progress | None) -> memoryview:
        if self.cache.has(digest):
            metrics.CACHE_LOOKUPS.labels("hit").inc()
            return self.cache.view(digest)
        metrics.CACHE_LOOKUPS.labels("miss").inc()
        failures = []
        for source in self.sources:
            part = self.cache.partial(digest)
            try:
                source.fetch(digest, part, self.max_bytes, progress)
                self.cache.commit(part)
            except BlobError as err:
                failures.append(f"{source.name}: {err}")
                part.discard()  # a source that failed leaves nothing for the next to trust
                continue
            self.fetched.append(digest)
            data = self.cache.view(digest)
            metrics.TRANSFER_BYTES.labels("down").inc(len(data))
            return data
        raise BlobError(f"blob {digest[:12]}: no source could serve it ("
                        + "; ".join(failures or ["no sources"]) + ")")

"""A directory of content-addressed blobs, named by the SHA-256 of their bytes.

::

    ROOT/ab/abcdef...        a whole blob whose SHA-256 is its name (never anything else)
    ROOT/.partial/abcdef...  a transfer under way; resumable: it is only ever appended to

A blob gets into the store only through ``commit`` (or ``put``), which hashes the bytes and
renames them into place only if they match the name they were fetched under, so whatever a
mirror or a dropped connection did, a blob in the store is whole and right. The coordinator
keeps every blob; a node's cache has a size cap and evicts the least recently used (``get``
marks a blob used).

Pure Python (no torch): both sides use it, and ``protocol`` stays light.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
from collections.abc import Iterator
from typing import Any, BinaryIO
from pathlib import Path

from protocol.errors import BlobError

__all__ = ["BlobDir", "Partial", "check_digest"]

_DIGEST = re.compile(r"[0-9a-f]{64}")
_READ = 4 << 20  # hashing and serving read this much at a time


def check_digest(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex characters, else ``BlobError``."""
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise BlobError(f"not a blob digest: {str(digest)[:80]!r}")
    return digest


def _stored(what: str, exc: OSError) -> BlobError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return BlobError(f"cannot store {what}: {'disk full' if full else exc.strerror or exc}")


class Partial:
    """A blob being received: append chunks, then ``BlobDir.commit`` (or ``discard``).

    The bytes are hashed as they are written (one pass: a resumed transfer hashes what an
    earlier one left, once), and the file stays open between chunks.
    """

    def __init__(self, path: Path, digest: str) -> None:
        self.path, self.digest = path, digest
        self._file: BinaryIO | None = None
        self._hash: Any = None

    @property
    def size(self) -> int:
        """Bytes received so far (where a resumed transfer starts)."""
        if self._file is not None:
            return self._file.tell()
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, data: bytes) -> None:
        try:
            if self._file is None:
                self._hash = hashlib.sha256()
                if self.path.exists():  # resuming: what is already here counts
                    with self.path.open("rb") as f:
                        while chunk := f.read(_READ):
                            self._hash.update(chunk)
                self._file = self.path.open("ab")
            self._file.write(data)
            self._hash.update(data)
        except OSError as exc:
            self.discard()
            raise _stored(f"blob {self.digest[:12]}", exc) from None

    def finish(self) -> str:
        """Close the file; the hex SHA-256 of everything in it."""
        if self._file is not None:
            self._file.close()
            self._file = None
            return str(self._hash.hexdigest())
        h = hashlib.sha256()  # nothing appended by us: hash what is there
        with self.path.open("rb") as f:
            while chunk := f.read(_READ):
                h.update(chunk)
        return h.hexdigest()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


class BlobDir:
    """Content-addressed blobs under ``root``; ``max_bytes`` caps the whole (LRU eviction),
    None keeps everything."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        try:
            (self.root / ".partial").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _stored(f"blobs in {self.root}", exc) from None

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        """The stored blob's size; ``BlobError`` if it is not here."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobError(f"no blob {digest[:12]}") from None

    def get(self, digest: str) -> bytearray:
        """The blob's bytes, in one mutable buffer (arrays parsed from it are writeable
        views, no copy); it counts as used, for eviction. ``BlobError`` if absent."""
        path = self.path(digest)
        try:
            with path.open("rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
            os.utime(path)
        except FileNotFoundError:
            raise BlobError(f"no blob {digest[:12]}") from None
        return data

    def view(self, digest: str) -> memoryview:
        """The blob's bytes mapped from its file, copy-on-write: nothing is read or copied
        up front, pages come in as they are used, and arrays parsed from it are writeable
        views whose writes never reach the file. ``get`` of a 400 MB blob takes 0.5-0.6 s on
        the bench machine, nearly all of it page faults of the fresh buffer, more than the
        transfer's SHA-256; this takes 0.003 s. Safe against eviction: a blob is only ever
        replaced or unlinked, never truncated, and a mapping keeps its file. It counts as
        used, for eviction. ``BlobError`` if absent."""
        path = self.path(digest)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                mapped = (mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size
                          else bytearray())  # (an empty file cannot be mapped)
            os.utime(path)
        except FileNotFoundError:
            raise BlobError(f"no blob {digest[:12]}") from None
        return memoryview(mapped)

    def chunks(self, digest: str, offset: int = 0, size: int = 1 << 20) -> Iterator[bytes]:
        """The blob from ``offset`` on, ``size`` bytes at a time (for serving)."""
        path = self.path(digest)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise BlobError(f"no blob {digest[:12]}") from None
        with f:
            f.seek(offset)
            while chunk := f.read(size):
                yield chunk

    def partial(self, digest: str, tag: str = "") -> Partial:
        """Where a transfer of ``digest`` goes (picking up what an earlier one left); a
        ``tag`` keeps concurrent transfers of one digest apart (two nodes may upload the
        same bytes at once)."""
        name = check_digest(digest) + (f".{tag}" if tag else "")
        return Partial(self.root / ".partial" / name, digest)

    def commit(self, partial: Partial) -> Path:
        """Move a finished transfer into the store if its bytes hash to its digest; else
        discard it and raise ``BlobError``."""
        try:
            got = partial.finish()
        except FileNotFoundError:
            raise BlobError(f"blob {partial.digest[:12]}: nothing was received") from None
        except OSError as exc:
            partial.discard()
            raise _stored(f"blob {partial.digest[:12]}", exc) from None
        if got != partial.digest:
            partial.discard()
            raise BlobError(f"blob {partial.digest[:12]} does not match its digest "
                            f"(got {got[:12]}): discarded")
        dest = self.path(partial.digest)
        try:
            dest.parent.mkdir(exist_ok=True)
            os.replace(partial.path, dest)
        except OSError as exc:
            partial.discard()
            raise _stored(f"blob {partial.digest[:12]}", exc) from None
        self._evict(keep=partial.digest)
        return dest

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (checked against ``digest`` when given); returns its digest."""
        digest = digest or hashlib.sha256(data).hexdigest()
        if self.has(digest):
            return digest
        part = self.partial(digest)
        part.discard()
        part.append(data)
        self.commit(part)
        return digest

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        blobs = [(p.stat().st_mtime, p.stat().st_size, p)
                 for p in self.root.glob("??/*") if p.is_file()]
        total = sum(size for _, size, _ in blobs)
        for _, size, p in sorted(blobs):  # least recently used first
            if total <= self.max_bytes:
                break
            if p.name != keep:
                p.unlink(missing_ok=True)
                total -= size

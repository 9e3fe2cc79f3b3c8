"""Deterministic digests of named arrays and of raw bytes.

``digest_arrays`` is the hex SHA-256 of this byte string (the same on every machine)::

    for name in sorted(arrays):              # by Unicode code point == by UTF-8 bytes
        a = arrays[name] as little-endian, C-contiguous (values unchanged)
        field(name.encode("utf-8"))
        field(a.dtype.str.encode("ascii"))   # e.g. b"<f4", b"<u2", b"|u1", b"|b1"
        field(b"".join(uint64_le(d) for d in a.shape))   # empty for a 0-d array
        field(raw bytes of a)

    field(x) = uint64_le(len(x)) + x

Byte order is normalised, so a big-endian array and its little-endian copy share a
digest; a change of name, dtype (float32 vs float64), shape (reshape) or any byte
does not. Only boolean, integer, float and complex dtypes are accepted.

That byte string is also how named arrays travel as a content-addressed blob
(``arrays_to_bytes``): the blob's SHA-256 *is* ``digest_arrays``, so a model version named by
its digest in a lease can come from any mirror, and ``arrays_from_bytes`` parses it back
strictly (hostile bytes raise ``ProtocolError``, never allocate more than they hold).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Mapping

import numpy as np

from protocol.errors import ProtocolError

__all__ = ["arrays_from_bytes", "arrays_to_bytes", "digest_arrays", "digest_bytes",
           "normalise_array"]

_KINDS = frozenset("biufc")


def normalise_array(name: str, array: np.ndarray) -> np.ndarray:
    """Return ``array`` as a little-endian, C-contiguous array (no copy if already so).

    Raises
    ------
    ProtocolError
        If ``array`` is not an ndarray of a numeric or boolean dtype.
    """
    if not isinstance(array, np.ndarray):
        raise ProtocolError(f"array {name!r} is {type(array).__name__}, not a numpy array")
    if array.dtype.kind not in _KINDS or array.dtype.fields is not None:
        raise ProtocolError(f"array {name!r} has unsupported dtype {array.dtype.str}")
    a = array.astype(array.dtype.newbyteorder("<"), copy=False)
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return a if a.flags.c_contiguous else a.copy(order="C")


def _canonical(arrays: Mapping[str, np.ndarray]) -> Iterator[bytes | memoryview]:
    """The pieces of the canonical layout, in order (array bodies as views, not copies)."""
    names = list(arrays)
    for name in names:
        if not isinstance(name, str):
            raise ProtocolError(f"array name {name!r} is not a str")
    for name in sorted(names):
        a = normalise_array(name, arrays[name])
        raw_name = name.encode("utf-8")
        dtype = a.dtype.str.encode("ascii")
        shape = b"".join(struct.pack("<Q", d) for d in a.shape)
        for part in (raw_name, dtype, shape):
            yield struct.pack("<Q", len(part))
            yield part
        yield struct.pack("<Q", a.nbytes)
        # The buffer in place: model arrays can be hundreds of MB.
        yield memoryview(a.reshape(-1).view(np.uint8))


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """Hex SHA-256 of named arrays in the canonical layout of the module docstring."""
    h = hashlib.sha256()
    for part in _canonical(arrays):
        h.update(part)
    return h.hexdigest()


def arrays_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The canonical layout itself: ``digest_bytes(arrays_to_bytes(a)) == digest_arrays(a)``."""
    return b"".join(_canonical(arrays))


_MAX_DIMS = 32  # numpy's own limit is 64; no model array has more than a handful


def arrays_from_bytes(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """Parse ``arrays_to_bytes`` output strictly: names unique, UTF-8 and in sorted order,
    little-endian numeric dtypes in their canonical spelling, every length within what is
    left. So a blob that parses is exactly ``arrays_to_bytes`` of what it parses to, and its
    SHA-256 is their ``digest_arrays``. The arrays are views of ``data`` (no copy; writeable
    if ``data`` is a bytearray).

    Raises
    ------
    ProtocolError
        On anything else, naming what is wrong.
    """
    view, pos, out, last = memoryview(data), 0, {}, None

    def take(what: str) -> memoryview:
        nonlocal pos
        if pos + 8 > len(view):
            raise ProtocolError(f"array blob: truncated at {what} (byte {pos})")
        (n,) = struct.unpack_from("<Q", view, pos)
        if n > len(view) - pos - 8:
            raise ProtocolError(f"array blob: {what} of {n} bytes overruns the blob")
        pos += 8 + n
        return view[pos - n:pos]

    while pos < len(view):
        try:
            name = bytes(take("a name")).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("array blob: a name is not UTF-8") from None
        if last is not None and name.encode() <= last.encode():
            raise ProtocolError(f"array blob: {name!r} is out of order or repeated")
        last = name
        try:
            raw_dtype = bytes(take(f"{name!r} dtype")).decode("ascii")
            dtype = np.dtype(raw_dtype)
        except (TypeError, ValueError, UnicodeDecodeError):
            raise ProtocolError(f"array blob: {name!r} has an unreadable dtype") from None
        # Only the canonical spelling (b"<f4", b"|u1"), so that a blob parses back to arrays
        # whose digest is the blob's own SHA-256: no second hash of the model is needed.
        if (dtype.kind not in _KINDS or dtype.fields is not None
                or dtype.newbyteorder("<").str != raw_dtype):
            raise ProtocolError(f"array blob: {name!r} has unsupported dtype {raw_dtype!r}")
        raw_shape = take(f"{name!r} shape")
        if len(raw_shape) % 8 or len(raw_shape) // 8 > _MAX_DIMS:
            raise ProtocolError(f"array blob: {name!r} has a malformed shape")
        shape = struct.unpack(f"<{len(raw_shape) // 8}Q", raw_shape)
        body = take(f"{name!r} data")
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != len(body):
            raise ProtocolError(f"array blob: {name!r} holds {len(body)} bytes, shape "
                                f"{shape} of {dtype.str} needs {count * dtype.itemsize}")
        out[name] = np.frombuffer(body, dtype=dtype).reshape(shape)
    return out


def digest_bytes(b: bytes) -> str:
    """Hex SHA-256 of ``b``."""
    return hashlib.sha256(b).hexdigest()

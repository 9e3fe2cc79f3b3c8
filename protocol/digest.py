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
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np

from protocol.errors import ProtocolError

__all__ = ["digest_arrays", "digest_bytes", "normalise_array"]

_KINDS = frozenset("biufc")


def _field(h: hashlib._Hash, data: bytes | np.ndarray, length: int) -> None:
    h.update(struct.pack("<Q", length))
    h.update(data)


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


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """Hex SHA-256 of named arrays in the canonical layout of the module docstring."""
    names = list(arrays)
    for name in names:
        if not isinstance(name, str):
            raise ProtocolError(f"array name {name!r} is not a str")
    h = hashlib.sha256()
    for name in sorted(names):
        a = normalise_array(name, arrays[name])
        raw_name = name.encode("utf-8")
        dtype = a.dtype.str.encode("ascii")
        shape = b"".join(struct.pack("<Q", d) for d in a.shape)
        _field(h, raw_name, len(raw_name))
        _field(h, dtype, len(dtype))
        _field(h, shape, len(shape))
        # Hash the buffer in place: model arrays can be hundreds of MB.
        _field(h, a.reshape(-1).view(np.uint8), a.nbytes)
    return h.hexdigest()


def digest_bytes(b: bytes) -> str:
    """Hex SHA-256 of ``b``."""
    return hashlib.sha256(b).hexdigest()

"""Flower record <-> numpy helpers for protocol messages (private)."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from protocol._fields import check_keys, require
from protocol.errors import ProtocolError

__all__ = ["array_record", "decode_arrays", "take_records"]

_NUMPY_STYPE = "numpy.ndarray"


def array_record(arrays: Mapping[str, np.ndarray], what: str) -> ArrayRecord:
    """ArrayRecord of ``arrays`` (names kept, in order); ``what`` names it in errors."""
    record = ArrayRecord()
    for name, a in arrays.items():
        require(isinstance(name, str), what, f"array name {name!r} is not a str")
        require(isinstance(a, np.ndarray), f"{what}.{name}", "expected a numpy array")
        record[name] = Array(ndarray=a)
    return record


def _check_npy(data: bytes) -> None:
    """Check the .npy header against the payload size before numpy allocates anything.

    ``np.load`` on a byte stream allocates the whole array the header claims before
    reading; a hostile header could claim terabytes.
    """
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"npy version {version}")
    shape, _, dtype = readers[version](fp)
    if dtype.kind not in "biufc" or math.prod(shape) * dtype.itemsize != len(data) - fp.tell():
        raise ValueError("npy header does not match payload size")


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header numpy writes for a C-ordered array of ``dtype`` and ``shape``."""
    fp = io.BytesIO()
    np.lib.format.write_array_header_1_0(fp, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": shape})
    return fp.getvalue()


def _exact(arr: Array) -> np.ndarray | None:
    """``arr`` decoded without parsing its header, where the header is byte for byte the
    one numpy writes for the dtype and shape the Array claims (any array this project
    sends); None otherwise. Parsing a header costs ~0.1 ms (``ast.literal_eval``): a
    model's update of 30-300 arrays was most of the coordinator's screening time."""
    try:
        dtype, shape = np.dtype(arr.dtype), tuple(int(n) for n in arr.shape)
        header = _npy_header(dtype.str, shape)
    except (TypeError, ValueError):
        return None
    data = arr.data
    if dtype.kind not in "biufc" or not data.startswith(header) or \
            len(data) - len(header) != math.prod(shape) * dtype.itemsize:
        return None
    # a copy, as np.load makes: writable, and not pinning the message's bytes
    return np.frombuffer(data, dtype, offset=len(header)).reshape(shape).copy()


def decode_arrays(record: ArrayRecord, what: str) -> dict[str, np.ndarray]:
    """Decode every array strictly; raises ``ProtocolError`` naming ``what.<name>``."""
    arrays: dict[str, np.ndarray] = {}
    for name, arr in record.items():
        where = f"{what}.{name}"
        require(arr.stype == _NUMPY_STYPE, where, f"unsupported stype {arr.stype!r}")
        if (fast := _exact(arr)) is not None:
            arrays[name] = fast
            continue
        try:
            _check_npy(arr.data)
            a = arr.numpy()
            claimed = np.dtype(arr.dtype)
        except Exception as exc:  # np.load raises many types on hostile bytes
            raise ProtocolError(f"{where}: cannot decode array ({type(exc).__name__})") from None
        require(isinstance(a, np.ndarray), where, "not a single .npy array")
        require(a.dtype.kind in "biufc", where, f"unsupported dtype {a.dtype.str}")
        require(a.dtype == claimed and a.shape == tuple(arr.shape), where,
                "header does not match data")
        arrays[name] = a
    return arrays


def take_records(content: RecordDict, expected: Mapping[str, type], what: str) -> list[Any]:
    """The records of ``content`` in ``expected`` order; exactly those keys and types."""
    require(isinstance(content, RecordDict), what, "expected a RecordDict")
    check_keys(content, set(expected), what)
    for key, kind in expected.items():
        require(isinstance(content[key], kind), f"{what}.{key}", f"expected {kind.__name__}")
    return [content[key] for key in expected]

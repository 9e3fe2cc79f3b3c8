from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.digest import digest_arrays, digest_bytes
from protocol.errors import ProtocolError


def _arrays() -> dict[str, np.ndarray]:
    return {
        "wte": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ln.bias": np.array([0.5, -1.25], dtype=np.float32),
        "tokens": np.array([0, 1, 65535], dtype=np.uint16),
    }


def test_same_arrays_same_digest_regardless_of_insertion_order() -> None:
    a = _arrays()
    b = dict(reversed(list(_arrays().items())))
    assert list(a) != list(b)
    assert digest_arrays(a) == digest_arrays(b)


def test_layout_and_byte_order_do_not_matter() -> None:
    a = _arrays()
    b = dict(a)
    b["wte"] = np.asfortranarray(a["wte"]).astype(">f4")
    assert digest_arrays(a) == digest_arrays(b)


@pytest.mark.parametrize("change", ["name", "dtype", "shape", "byte", "drop"])
def test_any_change_changes_the_digest(change: str) -> None:
    a = _arrays()
    b = {k: v.copy() for k, v in a.items()}
    if change == "name":
        b["wte2"] = b.pop("wte")
    elif change == "dtype":
        b["ln.bias"] = b["ln.bias"].astype(np.float64)  # same values
    elif change == "shape":
        b["wte"] = b["wte"].reshape(4, 3)
    elif change == "byte":
        b["wte"].reshape(-1).view(np.uint8)[5] ^= 1
    else:
        del b["tokens"]
    assert digest_arrays(a) != digest_arrays(b)


def test_known_answer() -> None:
    # Pinned once: a change here is a wire-format change (bump the format, tell every node).
    tiny = {"b": np.array([1.0, -2.0], dtype=np.float32), "a": np.array([[7]], dtype=np.uint16)}
    assert digest_arrays(tiny) == (
        "04923ac4f27df654596c75870ed7e3bcfc4414384d6a54b81dc7bbd4509fe53f"
    )
    assert digest_arrays({}) == hashlib.sha256(b"").hexdigest()


def test_layout_matches_the_docstring() -> None:
    """Rebuild the digest with hashlib + struct only, as a third party would."""
    tiny = {"b": np.array([1.0, -2.0], dtype=np.float32), "a": np.array([[7]], dtype=np.uint16)}

    def field(x: bytes) -> bytes:
        return struct.pack("<Q", len(x)) + x

    blob = b""
    for name, dtype, shape, raw in [
        ("a", "<u2", (1, 1), struct.pack("<H", 7)),
        ("b", "<f4", (2,), struct.pack("<2f", 1.0, -2.0)),
    ]:
        blob += field(name.encode()) + field(dtype.encode())
        blob += field(b"".join(struct.pack("<Q", d) for d in shape)) + field(raw)
    assert digest_arrays(tiny) == hashlib.sha256(blob).hexdigest()


def test_zero_d_and_empty_arrays_are_distinct() -> None:
    assert digest_arrays({"x": np.array(0.0, dtype=np.float32)}) != digest_arrays(
        {"x": np.zeros((1,), dtype=np.float32)})
    assert digest_arrays({"x": np.zeros((0, 3))}) != digest_arrays({"x": np.zeros((3, 0))})


@pytest.mark.parametrize("bad", [np.array([1, None], dtype=object), [1.0, 2.0],
                                 np.zeros(2, dtype=[("a", "<f4")]), np.array(["x"])])
def test_rejects_non_numeric(bad: object) -> None:
    with pytest.raises(ProtocolError, match="'x'"):
        digest_arrays({"x": bad})  # type: ignore[dict-item]


def test_digest_bytes() -> None:
    assert digest_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=20))
def test_digest_depends_only_on_values(values: list[float]) -> None:
    a = np.array(values, dtype=np.float32)
    assert digest_arrays({"w": a}) == digest_arrays({"w": a.astype(">f4")})
    assert digest_arrays({"w": a}) == digest_arrays({"w": a[::-1].copy()[::-1]})

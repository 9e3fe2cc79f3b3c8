"""Compressed pseudo-gradients: what a node sends instead of fp32 arrays.

An encoding is itself a set of named arrays, so it is digested, signed and carried like any
arrays, and the signature binds the exact bytes sent. For a model array ``name`` of ``n``
values (flattened in C order)::

    none   {name: float32, the model's shape}
    int8   {name + "/q": int8 (n,), name + "/scale": float32 (ceil(n / block),)}
           blockwise absmax (as INTELLECT-1 / hivemind's uniform 8-bit): each run of ``block``
           values has scale = max|x| / 127 and q = round(x / scale); decoded x' = q * scale,
           so |x - x'| <= scale / 2. 1.02 bytes per value at block 256 (3.9x less than fp32)
    topk   {name + "/idx": int32 (k,), name + "/val": float32 (k,)}, k = max(1, ceil(fraction
           * n)): the k values of largest magnitude, indices ascending; the rest decodes to 0.
           With ``feedback`` what was dropped is not lost: the node adds it to its next update
           (``ErrorFeedback``). That makes an honest update depend on the node's history, which
           no second node or recomputation can reproduce, so a run config refuses feedback
           together with spot checks (``coordinator.config``)

``decode`` checks the structure before it builds anything: exactly the expected names and
dtypes, every count as the scheme and the model's shapes declare, scales finite, >= 0 and at
most ``max_abs / 127``, values finite and at most ``max_abs``, indices unique, ascending and in
range. Anything else is a ``ProtocolError`` naming what is wrong (the coordinator records it
as a ``bad_encoding`` rejection).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.errors import ProtocolError

__all__ = [
    "SCHEMES", "Compression", "ErrorFeedback", "apply_delta", "decode", "encode", "encode_delta",
    "encoded_bytes",
]

SCHEMES = ("none", "int8", "topk")
Shapes = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Compression:
    """How train updates are encoded (``[compression]`` in ``run.toml``)."""

    scheme: str = "int8"
    block: int = 256  # int8: values per scale
    fraction: float = 0.01  # topk: share of each array's values sent
    feedback: bool = False  # topk: the node carries what it dropped into its next update

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ProtocolError(f"compression.scheme: must be one of {', '.join(SCHEMES)}, "
                                f"got {self.scheme!r}")
        if not (type(self.block) is int and 1 <= self.block <= 1 << 20):
            raise ProtocolError(f"compression.block: must be an int in 1..2^20, got {self.block!r}")
        if not (type(self.fraction) is float and 0 < self.fraction <= 1):
            raise ProtocolError(f"compression.fraction: must be in (0, 1], got {self.fraction!r}")

        if type(self.feedback) is not bool:
            raise ProtocolError(f"compression.feedback: must be a bool, got {self.feedback!r}")

    def to_dict(self) -> dict[str, str | int | float | bool]:
        return {"scheme": self.scheme, "block": self.block, "fraction": float(self.fraction),
                "feedback": self.feedback}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Compression:
        if set(d) != {"scheme", "block", "fraction", "feedback"}:
            raise ProtocolError(f"compression: expected scheme, block, fraction and feedback, "
                                f"got {sorted(d)}")
        return cls(d["scheme"], d["block"], d["fraction"], d["feedback"])  # type: ignore[arg-type]

    def k(self, n: int) -> int:
        """topk: how many of ``n`` values are sent."""
        return min(n, max(1, math.ceil(self.fraction * n)))


def encode(arrays: Mapping[str, np.ndarray], c: Compression) -> dict[str, np.ndarray]:
    """The encoding of float32 ``arrays`` under ``c``."""
    if c.scheme == "none":
        return {k: np.asarray(a, np.float32) for k, a in arrays.items()}
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        flat = np.asarray(a, np.float32).reshape(-1)
        if c.scheme == "int8":
            n, b = flat.size, c.block
            padded = np.zeros(-(-n // b) * b, np.float32)
            padded[:n] = flat
            blocks = padded.reshape(-1, b)
            scale = np.abs(blocks).max(axis=1) / np.float32(127)
            safe = np.where(scale > 0, scale, np.float32(1))
            with np.errstate(invalid="ignore"):  # NaN in, NaN scale out: decode refuses it
                q = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
            out[name + "/q"] = q.reshape(-1)[:n]
            out[name + "/scale"] = scale.astype(np.float32)
        else:
            k = c.k(flat.size)
            if k == 0:  # an empty array
                out[name + "/idx"], out[name + "/val"] = np.zeros(0, np.int32), flat.copy()
                continue
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
            idx = np.sort(idx).astype(np.int32)
            out[name + "/idx"] = idx
            out[name + "/val"] = flat[idx].astype(np.float32)
    return out


def _take(enc: Mapping[str, np.ndarray], key: str, dtype: str, size: int) -> np.ndarray:
    a = enc[key]
    if a.dtype != np.dtype(dtype) or a.ndim != 1 or a.size != size:
        raise ProtocolError(f"encoding: {key!r} must be 1-D {np.dtype(dtype).str} of {size} "
                            f"values, got {a.dtype.str} {tuple(a.shape)}")
    return a


def decode(enc: Mapping[str, np.ndarray], c: Compression, shapes: Shapes,
           max_abs: float) -> dict[str, np.ndarray]:
    """The float32 arrays ``enc`` encodes, after checking its structure (module docstring);
    ``max_abs`` bounds any one value (an update's L2 norm bound bounds each of its values)."""
    suffixes = {"none": ("",), "int8": ("/q", "/scale"), "topk": ("/idx", "/val")}[c.scheme]
    want = {name + s for name in shapes for s in suffixes}
    if set(enc) != want:
        missing, extra = sorted(want - set(enc)), sorted(set(enc) - want)
        raise ProtocolError(f"encoding ({c.scheme}): missing {missing[:2]}, unexpected "
                            f"{extra[:2]}")
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in shapes.items():
        n = math.prod(shape)
        if c.scheme == "none":
            a = enc[name]
            if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
                raise ProtocolError(f"encoding: {name!r} must be {np.dtype(dtype).str} "
                                    f"{tuple(shape)}, got {a.dtype.str} {tuple(a.shape)}")
            out[name] = a
            continue
        if c.scheme == "int8":
            q = _take(enc, name + "/q", "<i1", n)
            scale = _take(enc, name + "/scale", "<f4", -(-n // c.block))
            if not (np.isfinite(scale).all() and (scale >= 0).all()
                    and (scale <= max_abs / 127).all()):
                raise ProtocolError(f"encoding: {name!r} has a scale that is negative, not "
                                    f"finite or above {max_abs / 127:.4g}")
            if q.size and q.min() == -128:  # a min is one fast pass; == then any() is two
                raise ProtocolError(f"encoding: {name!r} has a value -128 (int8 codes are "
                                    "-127..127)")
            flat = _dequantize(q, scale, c.block)
        else:
            k = c.k(n)
            idx = _take(enc, name + "/idx", "<i4", k)
            val = _take(enc, name + "/val", "<f4", k)
            if k and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
                raise ProtocolError(f"encoding: {name!r} indices must be unique, ascending "
                                    f"and in 0..{n - 1}")
            if not (np.isfinite(val).all() and (np.abs(val) <= max_abs).all()):
                raise ProtocolError(f"encoding: {name!r} has a value not finite or above "
                                    f"{max_abs:.4g}")
            flat = np.zeros(n, np.float32)
            flat[idx] = val
        out[name] = flat.reshape(shape)
    return out


def _dequantize(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """codes x their block's scale, in one pass into one new float32 array (the coordinator
    decodes every update: no int8->float32 copy, no repeated scales)."""
    n = q.size
    out = np.empty(n, np.float32)
    full = n - n % block
    rows = full // block
    np.multiply(q[:full].reshape(rows, block), scale[:rows, None],
                out=out[:full].reshape(rows, block))
    if full < n:
        np.multiply(q[full:], scale[rows], out=out[full:])
    return out


def encode_delta(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                 block: int) -> dict[str, np.ndarray]:
    """The int8 encoding of ``new - old``: how a new model version travels to nodes that
    hold the previous one (a quarter of the bytes)."""
    return encode({k: np.subtract(new[k], old[k], dtype=np.float32) for k in old},
                  Compression("int8", block=block))


def apply_delta(old: Mapping[str, np.ndarray], enc: Mapping[str, np.ndarray],
                block: int) -> dict[str, np.ndarray]:
    """``old`` + the change ``enc`` encodes, in float32: bit for bit the version the
    coordinator made from it (both sides run these same float32 operations); the caller
    checks the result against the version's digest. ``ProtocolError`` on a bad encoding."""
    shapes = {k: (tuple(a.shape), "<f4") for k, a in old.items()}
    change = decode(enc, Compression("int8", block=block), shapes, math.inf)
    return {k: np.add(old[k], change[k], dtype=np.float32) for k in old}


def encoded_bytes(enc: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoding (what crosses the network, headers aside)."""
    return sum(int(a.nbytes) for a in enc.values())


class ErrorFeedback:
    """What top-k left out of the updates sent so far, added to the next one (so dropped
    coordinates are delayed, not lost). ``residual`` is kept by the node between leases."""

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual = {k: np.asarray(v, np.float32) for k, v in (residual or {}).items()}

    def encode(self, arrays: Mapping[str, np.ndarray], c: Compression) -> dict[str, np.ndarray]:
        """Encode ``arrays`` plus the carried residual, and carry what this encoding drops
        (topk with ``feedback`` only; otherwise a plain ``encode``)."""
        if c.scheme != "topk" or not c.feedback:
            return encode(arrays, c)
        target = {}
        for k, a in arrays.items():
            r = self.residual.get(k)
            a = np.asarray(a, np.float32)
            # a residual of another model (a new run) is dropped, not broadcast
            target[k] = a + r if r is not None and r.shape == a.shape else a.copy()
        enc = encode(target, c)
        shapes = {k: (tuple(a.shape), "<f4") for k, a in target.items()}
        sent = decode(enc, c, shapes, math.inf)
        self.residual = {k: target[k] - sent[k] for k in target}
        return enc

"""Cutting a token range into shards, and the digest that binds a shard's bytes to a lease."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.digest import digest_bytes

__all__ = ["Shard", "make_shards", "data_digest", "shard_bytes"]


@dataclass(frozen=True)
class Shard:
    """Tokens ``[start, end)`` of the corpus token file."""

    shard_id: int
    start: int
    end: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


def make_shards(start: int, end: int, shard_tokens: int) -> list[Shard]:
    """Cut ``[start, end)`` into consecutive shards of ``shard_tokens`` tokens.

    Shards cover the range exactly, without overlap. A remainder shorter than half a
    shard is merged into the last shard rather than becoming a scrap too short to train on.

    Raises
    ------
    ValueError
        If ``shard_tokens <= 0`` or ``end < start``.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if end < start:
        raise ValueError(f"empty range: end {end} < start {start}")
    bounds = list(range(start, end, shard_tokens)) + [end]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < shard_tokens // 2:
        del bounds[-2]
    return [Shard(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def data_digest(tokens: np.ndarray, dtype: str | np.dtype = "<u2") -> str:
    """Hex SHA-256 of ``tokens`` as little-endian bytes of the corpus's token ``dtype``
    (``CorpusInfo.dtype``: ``<u2`` or ``<u4``): a lease's ``data_digest``, and the bytes of
    the shard blob it names (``shard_bytes``)."""
    return digest_bytes(shard_bytes(tokens, dtype))


def shard_bytes(tokens: np.ndarray, dtype: str | np.dtype = "<u2") -> bytes:
    """``tokens`` as the little-endian bytes of ``dtype``, the layout of a shard blob.

    Raises
    ------
    ValueError
        If ``dtype`` is not ``<u2``/``<u4`` (any byte order) or a token does not fit in it.
    """
    dt = np.dtype(dtype).newbyteorder("<")
    if dt not in (np.dtype("<u2"), np.dtype("<u4")):
        raise ValueError(f"token dtype must be uint16 or uint32, got {np.dtype(dtype)}")
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dt).max):
        raise ValueError(f"tokens do not fit in {dt.name}")
    return np.ascontiguousarray(arr, dtype=dt).tobytes()

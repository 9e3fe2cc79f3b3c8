"""Cutting a token range into shards, and the digest that binds a shard's bytes to a lease."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.digest import digest_bytes

__all__ = ["Shard", "make_shards", "data_digest"]


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


def data_digest(tokens: np.ndarray) -> str:
    """Hex SHA-256 of ``tokens`` as little-endian uint16 bytes: a lease's ``data_digest``."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise ValueError("tokens do not fit in uint16")
    return digest_bytes(np.ascontiguousarray(arr, dtype="<u2").tobytes())

from __future__ import annotations

import numpy as np
import pytest

from protocol.digest import digest_bytes
from training.shards import Shard, data_digest, make_shards


@pytest.mark.parametrize("start,end,size", [(0, 1000, 100), (7, 1000, 64), (100, 150, 100), (0, 1, 5)])
def test_shards_cover_the_range_without_overlap(start, end, size):
    shards = make_shards(start, end, size)
    assert shards[0].start == start and shards[-1].end == end
    for a, b in zip(shards, shards[1:]):
        assert a.end == b.start
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    assert sum(s.n_tokens for s in shards) == end - start
    assert all(s.n_tokens > 0 for s in shards)


def test_small_remainder_is_merged_and_large_one_kept():
    assert make_shards(0, 1030, 100)[-1] == Shard(9, 900, 1030)
    assert make_shards(0, 1060, 100)[-1] == Shard(10, 1000, 1060)


def test_empty_and_invalid_ranges():
    assert make_shards(5, 5, 10) == []
    with pytest.raises(ValueError):
        make_shards(0, 10, 0)
    with pytest.raises(ValueError):
        make_shards(10, 0, 5)


def test_data_digest_is_digest_of_uint16_le_bytes():
    toks = np.array([1, 2, 258, 65535], dtype=np.uint16)
    assert data_digest(toks) == digest_bytes(b"\x01\x00\x02\x00\x02\x01\xff\xff")
    assert data_digest(toks.astype(">u2")) == data_digest(toks)
    assert data_digest(toks.astype(np.int64)) == data_digest(toks)
    with pytest.raises(ValueError):
        data_digest(np.array([70000]))

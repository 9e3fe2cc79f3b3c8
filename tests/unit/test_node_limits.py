"""A node refuses work bigger than it agreed to, before decoding or training anything."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from node.limits import NodeLimits, arch_params, check_model, check_work
from node.worker import WorkerSettings, do_work
from protocol.blobstore import BlobDir, Partial
from protocol.digest import arrays_to_bytes
from protocol.errors import BlobError, ConfigError, ProtocolError
from protocol.messages import Lease, parse_reply, parse_work, work_content
from protocol.signing import generate_key
from training.model import GPT, GPTConfig
from training.state import init_arrays

@dataclass
class CoordinatorBlobsFromDir:
    """A blob source over a local store (what the coordinator would stream)."""

    store: BlobDir
    name: str = "coordinator"

    def fetch(self, digest: str, into: Partial, max_bytes: int, progress) -> None:  # type: ignore[no-untyped-def]
        size = self.store.size(digest)
        if size > max_bytes:
            raise BlobError(f"blob {digest[:12]} is {size} bytes, over the limit of {max_bytes}")
        into.append(bytes(self.store.get(digest)))


CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
ARCH = dataclasses.asdict(CFG)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobDir:
    """The node's cache, holding what ``work`` leases (as if fetched)."""
    return BlobDir(tmp_path / "blobs")


def work(blobs: BlobDir, n_tokens: int = 64, *, batch_size: int = 2, seq_len: int = 8,
         arch: dict | None = None,
         model: dict[str, np.ndarray] | None = None):  # type: ignore[no-untyped-def]
    model = init_arrays(CFG, seed=0) if model is None else model
    tokens = (np.arange(n_tokens) % 256).astype("<u2")
    lease = Lease(run_id="r", round=1, shard_id=0, kind="train", base_version=0,
                  base_digest=blobs.put(arrays_to_bytes(model)), data_start=0,
                  data_end=n_tokens, data_digest=blobs.put(tokens.tobytes()), inner_steps=1,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  batch_size=batch_size, seq_len=seq_len, lr=1e-3, weight_decay=0.0, seed=1,
                  deadline=time.time() + 60, nonce="0" * 32)
    return work_content(lease, ARCH if arch is None else arch)


def settings(blobs: BlobDir, **limits: int) -> WorkerSettings:
    return WorkerSettings(node_id=1, key=generate_key(), threads=1, device="cpu",
                          limits=NodeLimits(**limits), cache=blobs)


def test_arch_params_matches_the_model_within_the_bias_allowance() -> None:
    real = sum(p.numel() for p in GPT(CFG).parameters())
    assert real <= arch_params(ARCH) <= real + 16 * CFG.n_embd


def test_work_within_limits_is_done(blobs: BlobDir) -> None:
    update, arrays = parse_reply(do_work(work(blobs), settings(blobs)))
    assert update.metrics.steps == 1 and arrays


@pytest.mark.parametrize("limits, match", [
    ({"max_shard_tokens": 63}, "max-shard-tokens"),
    ({"max_model_params": 1000}, "max-model-params"),
    ({"max_batch_tokens": 15}, "max-batch-tokens"),
])
def test_oversized_work_is_refused(blobs: BlobDir, limits: dict[str, int], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        do_work(work(blobs), settings(blobs, **limits))


def test_a_blob_over_the_byte_limit_is_refused_before_it_is_stored(tmp_path: Path,
                                                                   blobs: BlobDir) -> None:
    content = work(blobs)
    empty = BlobDir(tmp_path / "empty")  # nothing cached: the coordinator would be asked
    served = CoordinatorBlobsFromDir(blobs)
    s = dataclasses.replace(settings(empty, max_work_bytes=10_000), coordinator_blobs=served)
    with pytest.raises(BlobError, match="over the limit of 10000"):
        do_work(content, s)
    assert not any(empty.root.glob("??/*"))


def test_a_huge_architecture_is_refused_before_the_model_is_built(blobs: BlobDir) -> None:
    huge = dict(ARCH, n_layer=10_000, n_embd=16_384, n_head=16)
    with pytest.raises(ProtocolError, match="architecture"):
        do_work(work(blobs, arch=huge), settings(blobs))  # would allocate ~32e12 parameters


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "12"])
def test_arch_dimensions_must_be_positive_ints(blobs: BlobDir, bad: object) -> None:
    w = parse_work(work(blobs, arch=dict(ARCH, n_layer=bad)))
    with pytest.raises(ProtocolError, match="n_layer"):
        check_work(w.lease, w.arch, NodeLimits())


def test_claimed_shapes_count_not_just_bytes() -> None:
    # a blob whose shape claims 10^12 elements over a tiny payload never parses; a parsed
    # model is counted by its shapes before anything is built
    model = {"w": np.zeros((1000, 1000), np.float32)}
    with pytest.raises(ProtocolError, match="max-model-params"):
        check_model(model, NodeLimits(max_model_params=999_999))
    check_model(model, NodeLimits(max_model_params=1_000_000))


def test_huge_batches_are_refused(blobs: BlobDir) -> None:
    w = parse_work(work(blobs, batch_size=100_000, seq_len=16))
    with pytest.raises(ProtocolError, match="batch_size x seq_len"):
        check_work(w.lease, w.arch, NodeLimits())


def test_limits_come_from_node_config() -> None:
    assert NodeLimits.from_node_config({}) == NodeLimits()
    got = NodeLimits.from_node_config({"max-model-params": 5, "threads": 2})
    assert got.max_model_params == 5 and got.max_shard_tokens == NodeLimits().max_shard_tokens
    for bad in (0, -3, "5", 2.0, True):
        with pytest.raises(ConfigError, match="max-shard-tokens"):
            NodeLimits.from_node_config({"max-shard-tokens": bad})

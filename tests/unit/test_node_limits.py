"""A node refuses work bigger than it agreed to, before decoding or training anything."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from node.limits import NodeLimits, arch_params, check_work
from node.worker import WorkerSettings, do_work
from protocol.digest import digest_arrays, digest_bytes
from protocol.errors import ConfigError, ProtocolError
from protocol.messages import Lease, parse_reply, work_content
from protocol.signing import generate_key
from training.model import GPT, GPTConfig
from training.state import init_arrays

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
ARCH = dataclasses.asdict(CFG)


def work(n_tokens: int = 64, *, batch_size: int = 2, seq_len: int = 8, arch: dict | None = None,
         model: dict[str, np.ndarray] | None = None):  # type: ignore[no-untyped-def]
    model = init_arrays(CFG, seed=0) if model is None else model
    tokens = (np.arange(n_tokens) % 256).astype("<u2")
    lease = Lease(run_id="r", round=1, shard_id=0, kind="train", base_version=0,
                  base_digest=digest_arrays(model), data_start=0, data_end=n_tokens,
                  data_digest=digest_bytes(tokens.tobytes()), inner_steps=1,
                  batch_size=batch_size, seq_len=seq_len, lr=1e-3, weight_decay=0.0, seed=1,
                  deadline=time.time() + 60, nonce="0" * 32)
    return work_content(lease, model, tokens, arch=ARCH if arch is None else arch)


def settings(**limits: int) -> WorkerSettings:
    return WorkerSettings(node_id=1, key=generate_key(), threads=1, device="cpu",
                          limits=NodeLimits(**limits))


def test_arch_params_matches_the_model_within_the_bias_allowance() -> None:
    real = sum(p.numel() for p in GPT(CFG).parameters())
    assert real <= arch_params(ARCH) <= real + 16 * CFG.n_embd


def test_work_within_limits_is_done() -> None:
    update, arrays = parse_reply(do_work(work(), settings()))
    assert update.metrics.steps == 1 and arrays


@pytest.mark.parametrize("limits, match", [
    ({"max_shard_tokens": 63}, "max-shard-tokens"),
    ({"max_model_params": 1000}, "max-model-params"),
    ({"max_work_bytes": 10_000}, "max-work-bytes"),
    ({"max_batch_tokens": 15}, "max-batch-tokens"),
])
def test_oversized_work_is_refused(limits: dict[str, int], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        do_work(work(), settings(**limits))


def test_a_huge_architecture_is_refused_before_the_model_is_built() -> None:
    huge = dict(ARCH, n_layer=10_000, n_embd=16_384, n_head=16)
    with pytest.raises(ProtocolError, match="architecture"):
        do_work(work(arch=huge), settings())  # would allocate ~32e12 parameters


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "12"])
def test_arch_dimensions_must_be_positive_ints(bad: object) -> None:
    with pytest.raises(ProtocolError, match="n_layer"):
        check_work(work(arch=dict(ARCH, n_layer=bad)), NodeLimits())


def test_claimed_shapes_count_not_just_bytes() -> None:
    content = work()
    record = content["model"]
    assert isinstance(record, ArrayRecord)
    name = next(iter(record))
    arr = record[name]
    # a header claiming 10^12 elements over a tiny payload: refused by its claim
    record[name] = Array(dtype=arr.dtype, shape=(10**6, 10**6), stype=arr.stype, data=arr.data)
    with pytest.raises(ProtocolError, match="max-model-params"):
        check_work(content, NodeLimits())
    record[name] = Array(dtype=arr.dtype, shape=(-4, 8), stype=arr.stype, data=arr.data)
    with pytest.raises(ProtocolError, match="not a shape"):
        check_work(content, NodeLimits())


def test_huge_batches_are_refused() -> None:
    with pytest.raises(ProtocolError, match="batch_size x seq_len"):
        check_work(work(batch_size=100_000, seq_len=16), NodeLimits())


def test_limits_come_from_node_config() -> None:
    assert NodeLimits.from_node_config({}) == NodeLimits()
    got = NodeLimits.from_node_config({"max-model-params": 5, "threads": 2})
    assert got.max_model_params == 5 and got.max_shard_tokens == NodeLimits().max_shard_tokens
    for bad in (0, -3, "5", 2.0, True):
        with pytest.raises(ConfigError, match="max-shard-tokens"):
            NodeLimits.from_node_config({"max-shard-tokens": bad})

"""A warm worker's built model (training.model_cache): reused across leases, it gives on CPU
the bit-identical pseudo-gradient a fresh build gives; one module per architecture; a compiled
model is compiled on the first lease only."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from training.families import HF_PRESETS, HFSpec
from training.inner import train_inner
from training.model import GPTConfig
from node.supervisor import COMPILE_MODES
from training.model_cache import COMPILE_CHOICES, ModelCache, compile_choice
from training.state import init_arrays

GPT = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
LLAMA = HFSpec("llama", {**HF_PRESETS["llama"]["tiny"], "hidden_size": 32,
                         "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1,
                         "max_position_embeddings": 16})
KW = dict(steps=3, batch_size=2, seq_len=16, lr=3e-3, weight_decay=0.1, device="cpu")


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16)


@pytest.fixture
def no_dynamo_leftovers() -> Iterator[None]:
    yield
    torch._dynamo.reset()  # compiled code of this test's modules: not the next test's


def identical(a, b) -> bool:  # type: ignore[no-untyped-def]
    return (a.pseudo_grad.keys() == b.pseudo_grad.keys()
            and all(np.array_equal(a.pseudo_grad[k], b.pseudo_grad[k]) for k in a.pseudo_grad)
            and (a.loss_before, a.loss_after) == (b.loss_before, b.loss_after))


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama"])
def test_a_reused_model_gives_the_pseudo_gradient_of_a_fresh_one(cfg, tokens) -> None:
    cache = ModelCache()
    first, second = init_arrays(cfg, 0), init_arrays(cfg, 1)
    # the second lease starts from another base with another seed, in the module the first
    # lease left trained: nothing of that lease may leak into this one
    got = [train_inner(base, cfg, tokens, seed=seed, models=cache, **KW)
           for base, seed in ((first, 7), (second, 8))]
    assert (cache.builds, cache.reuses) == (1, 1)
    assert identical(got[0], train_inner(first, cfg, tokens, seed=7, **KW))
    assert identical(got[1], train_inner(second, cfg, tokens, seed=8, **KW))


def test_one_module_per_architecture_reset_for_each_lease() -> None:
    cache = ModelCache(keep=1)
    cpu = torch.device("cpu")
    base = init_arrays(GPT, 0)
    a = cache.load(base, GPT, cpu).module
    a.eval()  # what a lease that failed mid-step could leave behind
    for p in a.parameters():
        p.grad = torch.ones_like(p)
        with torch.no_grad():
            p.add_(1.0)
    again = cache.load(base, GPT, cpu).module
    assert again is a and (cache.builds, cache.reuses) == (1, 1)
    assert again.training and all(p.grad is None for p in again.parameters())
    assert all(torch.equal(p, torch.from_numpy(base[n])) for n, p in again.named_parameters())

    wider = dataclasses.replace(GPT, n_embd=64)
    b = cache.load(init_arrays(wider, 0), wider, cpu).module
    assert b is not a and cache.builds == 2
    assert cache.load(base, GPT, cpu).module is not a  # keep=1: a fell out when b came
    assert cache.load(base, GPT, cpu, checkpointing=True).module is not a
    with pytest.raises(ValueError, match="shape"):
        cache.load(init_arrays(wider, 0), dataclasses.replace(wider, n_embd=32), cpu)


def test_dropout_on_cpu_is_built_afresh_each_lease(tokens) -> None:
    # a fresh build draws the initial weights from the CPU generator before the dropout
    # masks: reusing the module would shift the masks, so it is never kept
    cfg = dataclasses.replace(GPT, dropout=0.2)
    cache = ModelCache()
    base = init_arrays(cfg, 0)
    got = [train_inner(base, cfg, tokens, seed=s, models=cache, **KW) for s in (7, 7)]
    assert (cache.builds, cache.reuses) == (2, 0)
    assert identical(got[1], train_inner(base, cfg, tokens, seed=7, **KW))


def test_a_compiled_model_is_compiled_on_the_first_lease_only(tokens,
                                                              no_dynamo_leftovers) -> None:
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward  # runs the traced graph eagerly: no compiler needed

    cache = ModelCache(use_compile=True, backend=counting_backend)
    first, second = init_arrays(GPT, 0), init_arrays(GPT, 1)
    a = train_inner(first, GPT, tokens, seed=7, models=cache, **KW)
    compiled = len(graphs)
    assert compiled >= 1
    b = train_inner(second, GPT, tokens, seed=8, models=cache, **KW)
    assert len(graphs) == compiled  # refilled in place: the guards still hold
    assert (cache.builds, cache.reuses) == (1, 1)
    # and the compiled module trained on each lease's own base
    for got, base, seed in ((a, first, 7), (b, second, 8)):
        want = train_inner(base, GPT, tokens, seed=seed, **KW)
        assert got.loss_before == want.loss_before
        for k in want.pseudo_grad:
            np.testing.assert_allclose(got.pseudo_grad[k], want.pseudo_grad[k], rtol=0,
                                       atol=1e-6)


def test_a_model_warmed_before_its_first_lease_compiles_nothing_more(
        tokens, no_dynamo_leftovers) -> None:
    # the worker compiles while the first lease's blobs download: that lease must find the
    # forward and the backward compiled for its batches (a batch laid out otherwise, other
    # strides, would compile again), and train its own base
    from torch._dynamo.backends.common import aot_autograd

    compiled: list[str] = []

    def counting(kind: str):  # type: ignore[no-untyped-def]
        def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            compiled.append(kind)
            return gm.forward
        return compiler

    cache = ModelCache(use_compile=True, backend=aot_autograd(
        fw_compiler=counting("forward"), bw_compiler=counting("backward")))
    cpu = torch.device("cpu")
    rng = torch.get_rng_state()
    assert cache.warm(GPT, cpu, batch_size=KW["batch_size"], seq_len=KW["seq_len"])
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's draws are its own
    assert sorted(compiled) == ["backward", "forward"]
    assert not cache.warm(GPT, cpu, batch_size=2, seq_len=16)  # held already
    base = init_arrays(GPT, 3)
    got = train_inner(base, GPT, tokens, seed=7, models=cache, **KW)
    assert sorted(compiled) == ["backward", "forward"], compiled
    assert (cache.builds, cache.reuses) == (1, 1)
    want = train_inner(base, GPT, tokens, seed=7, **KW)
    assert got.loss_before == want.loss_before
    for k in want.pseudo_grad:
        np.testing.assert_allclose(got.pseudo_grad[k], want.pseudo_grad[k], rtol=0, atol=1e-6)
    assert not ModelCache(use_compile=False).warm(GPT, cpu, batch_size=2, seq_len=16)


def test_a_model_that_fails_to_compile_trains_eager(tokens, no_dynamo_leftovers) -> None:
    def broken_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        raise RuntimeError("no compiler here")

    cache = ModelCache(use_compile=True, backend=broken_backend)
    base = init_arrays(GPT, 0)
    got = train_inner(base, GPT, tokens, seed=7, models=cache, **KW)
    assert identical(got, train_inner(base, GPT, tokens, seed=7, **KW))


def test_a_model_whose_backward_fails_to_compile_redoes_the_step_eager(
        tokens, no_dynamo_leftovers, caplog) -> None:
    # AOT autograd compiles the backward lazily, at the first backward(): a compiler that
    # breaks there must not cost the lease (the forward already ran compiled)
    from torch._dynamo.backends.common import aot_autograd

    forwards: list[int] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        forwards.append(1)
        return gm.forward

    def broken(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        raise RuntimeError("no backward compiler here")

    cache = ModelCache(use_compile=True,
                       backend=aot_autograd(fw_compiler=forward_compiler, bw_compiler=broken))
    base = init_arrays(GPT, 0)
    got = train_inner(base, GPT, tokens, seed=7, models=cache, **KW)
    assert forwards, "the forward was never compiled: the backward's failure was not tested"
    assert identical(got, train_inner(base, GPT, tokens, seed=7, **KW))
    assert sum("training this model eager" in r.getMessage() for r in caplog.records) == 1
    compiled = len(forwards)
    again = train_inner(init_arrays(GPT, 1), GPT, tokens, seed=8, models=cache, **KW)
    assert len(forwards) == compiled and cache.reuses == 1  # eager for good, no new attempt
    assert identical(again, train_inner(init_arrays(GPT, 1), GPT, tokens, seed=8, **KW))


def test_an_error_of_the_batch_itself_is_raised_not_hidden(tokens, no_dynamo_leftovers) -> None:
    # the eager redo meets the same error: it is the lease's, and it is raised
    cache = ModelCache(use_compile=True, backend=lambda gm, ex: gm.forward)
    bad = np.full(2000, 300, dtype=np.uint16)  # token ids past the 256-entry vocabulary
    with pytest.raises(IndexError):
        train_inner(init_arrays(GPT, 0), GPT, bad, seed=7, models=cache, **KW)


def test_the_compile_flag() -> None:
    assert [compile_choice(t) for t in ("auto", "ON", " off ")] == [None, True, False]
    with pytest.raises(ValueError, match="--compile must be one of auto, on, off"):
        compile_choice("fast")
    assert tuple(COMPILE_CHOICES) == COMPILE_MODES  # what join accepts is what workers read


def test_compiles_on_cuda_only_by_default() -> None:
    cache = ModelCache()
    assert cache.compiles(torch.device("cuda")) and not cache.compiles(torch.device("cpu"))
    assert ModelCache(use_compile=True).compiles(torch.device("cpu"))
    assert not ModelCache(use_compile=False).compiles(torch.device("cuda"))

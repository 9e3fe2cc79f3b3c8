from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.inner import first_batch_loss, sample_batch, train_inner
from training.model import GPTConfig
from training.state import arrays_to_model, init_arrays
from training.tokenizer import ByteTokenizer

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
KW = dict(steps=4, batch_size=4, seq_len=16, lr=3e-3, weight_decay=0.1, device="cpu")


@pytest.fixture(scope="module")
def base():
    return init_arrays(CFG, 0)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16)


def test_same_seed_gives_identical_pseudo_gradient(base, tokens):
    a = train_inner(base, CFG, tokens, seed=7, **KW)
    b = train_inner(base, CFG, tokens, seed=7, **KW)
    assert a.pseudo_grad.keys() == base.keys()
    assert all(np.array_equal(a.pseudo_grad[k], b.pseudo_grad[k]) for k in base)
    assert (a.loss_before, a.loss_after) == (b.loss_before, b.loss_after)


def test_different_seed_gives_a_different_pseudo_gradient(base, tokens):
    a = train_inner(base, CFG, tokens, seed=7, **KW)
    c = train_inner(base, CFG, tokens, seed=8, **KW)
    assert not all(np.array_equal(a.pseudo_grad[k], c.pseudo_grad[k]) for k in base)


def test_result_fields_and_base_untouched(base, tokens):
    before = {k: v.copy() for k, v in base.items()}
    calls = []
    r = train_inner(base, CFG, tokens, seed=1, progress=lambda *a: calls.append(a), **KW)
    assert all(np.array_equal(before[k], base[k]) for k in base)
    assert all(v.dtype == np.float32 and v.shape == base[k].shape for k, v in r.pseudo_grad.items())
    assert any(np.abs(v).max() > 0 for v in r.pseudo_grad.values())
    assert (r.steps, r.tokens) == (4, 4 * 4 * 16) and r.wall_s > 0
    assert calls == [(i, 4, i * 64) for i in range(1, 5)]


def test_loss_falls_on_a_repetitive_sequence(base):
    tokens = np.tile(ByteTokenizer().encode("def add(a, b):\n    return a + b\n"), 60)
    r = train_inner(base, CFG, tokens, seed=0, **dict(KW, steps=20, lr=1e-2))
    assert r.loss_before > 5.0
    assert r.loss_after < r.loss_before - 2.0


def test_rejects_a_shard_shorter_than_one_window(base):
    with pytest.raises(ValueError, match="seq_len"):
        train_inner(base, CFG, np.zeros(16, np.uint16), seed=0, **KW)
    with pytest.raises(ValueError, match="block_size"):
        train_inner(base, CFG, np.zeros(100, np.uint16), seed=0, **dict(KW, seq_len=32))


def test_first_batch_loss_is_the_reported_loss_before(base, tokens):
    # the coordinator's base check recomputes loss_before with first_batch_loss: on CPU the
    # two must agree exactly, and depend on the seed's batch and on the base
    r = train_inner(base, CFG, tokens, seed=7, **KW)
    kw = dict(batch_size=4, seq_len=16)
    assert first_batch_loss(base, CFG, tokens, seed=7, **kw) == r.loss_before
    assert first_batch_loss(base, CFG, tokens, seed=8, **kw) != r.loss_before
    local = {k: base[k] - r.pseudo_grad[k] for k in base}
    assert first_batch_loss(local, CFG, tokens, seed=7, **kw) < r.loss_before - 0.05

    # ... and it is the plain cross-entropy of the base on the batch the seed draws first
    model = arrays_to_model(base, CFG, "cpu")
    x, y = sample_batch(torch.from_numpy(tokens.astype(np.int64)), 4, 16,
                        torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits, _ = model(x, y)
    want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert r.loss_before == pytest.approx(want, abs=1e-6)


def test_loss_before_is_fp32_even_under_autocast(base, tokens, monkeypatch):
    # on CUDA the steps run under bf16 autocast; loss_before must not, or the coordinator's
    # fp32 recomputation would differ by bf16 rounding. CPU bf16 autocast stands in for it.
    @contextlib.contextmanager
    def bf16(_dev):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    monkeypatch.setattr("training.model_cache.autocast", bf16)  # the step's (forward_backward)
    r = train_inner(base, CFG, tokens, seed=7, **KW)
    assert r.loss_before == first_batch_loss(base, CFG, tokens, seed=7, batch_size=4, seq_len=16)
    monkeypatch.undo()
    plain = train_inner(base, CFG, tokens, seed=7, **dict(KW, steps=1))
    assert r.loss_before == plain.loss_before  # same number with or without autocast


def test_an_inner_state_carries_over_only_when_asked(base, tokens):
    fresh = train_inner(base, CFG, tokens, seed=1, **KW)
    assert fresh.opt_state is None  # the default: every lease starts AdamW afresh
    first = train_inner(base, CFG, tokens, seed=1, keep_opt_state=True, **KW)
    steps = {int(s["step"]) for s in first.opt_state["state"].values()}
    assert steps == {KW["steps"]}
    again = train_inner(base, CFG, tokens, seed=1, opt_state=first.opt_state,
                        keep_opt_state=True, **KW)
    assert {int(s["step"]) for s in again.opt_state["state"].values()} == {2 * KW["steps"]}
    # the carried moments change the update; the first lease's result was not touched
    assert any(not np.array_equal(again.pseudo_grad[k], first.pseudo_grad[k])
               for k in first.pseudo_grad)
    assert all(np.array_equal(first.pseudo_grad[k], fresh.pseudo_grad[k])
               for k in first.pseudo_grad)


def test_pseudo_gradient_is_the_host_subtraction_bit_for_bit(base, tokens):
    """``pseudo_gradient`` subtracts where the model lives; on the host it must give exactly
    the bits of ``base - model_to_arrays(model)`` (the coordinator recomputes those)."""
    from training.inner import pseudo_gradient
    from training.state import arrays_to_model, model_to_arrays

    trained = train_inner(base, CFG, tokens, seed=2, **KW)
    local = {k: np.asarray(base[k], np.float32) - trained.pseudo_grad[k] for k in base}
    model = arrays_to_model(local, CFG)
    got = pseudo_gradient(base, model)
    host = model_to_arrays(model)
    for k in base:
        want = np.asarray(base[k], np.float32) - host[k]
        assert got[k].dtype == np.float32
        assert np.array_equal(got[k].view(np.uint32), want.view(np.uint32)), k

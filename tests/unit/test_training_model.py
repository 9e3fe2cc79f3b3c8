from __future__ import annotations

import math

import pytest
import torch

from training.model import GPT, PRESETS, GPTConfig
from training.tokenizer import ByteTokenizer

CFG = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 256) and loss is None
    _, loss = model(idx, torch.randint(0, 256, (3, 16)))
    assert abs(loss.item() - math.log(256)) < 0.1  # near-uniform predictions at init


def test_weight_tying_lists_the_embedding_once():
    model = GPT(CFG)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        GPT(CFG)(torch.zeros(1, 17, dtype=torch.long))


def test_ignore_index_targets_do_not_count():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, 256, (1, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    _, loss_half = model(idx, targets)
    logits, _ = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[0, :4], idx[0, :4])
    assert loss_half.item() == pytest.approx(manual.item(), rel=1e-5)


def test_presets_are_valid_and_sized():
    assert {"tiny", "small", "gpt2"} <= set(PRESETS)
    assert all(c.vocab_size == 256 for c in PRESETS.values())
    assert PRESETS["gpt2"].n_layer == 12 and PRESETS["gpt2"].n_embd == 768


def test_bad_head_count_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_generate_extends_the_prompt():
    torch.manual_seed(0)
    model = GPT(CFG)
    prompt = torch.from_numpy(ByteTokenizer().encode("def ").astype("int64"))[None]
    out = model.generate(prompt, 20)  # longer than block_size: context is cropped
    assert out.shape == (1, 24) and torch.equal(out[:, :4], prompt)

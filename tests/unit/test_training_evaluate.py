from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training.evaluate import evaluate
from training.model import GPTConfig
from training.state import arrays_to_model, init_arrays

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)


def test_matches_a_manual_sum_over_non_overlapping_windows():
    arrays = init_arrays(CFG, 3)
    tokens = np.random.default_rng(1).integers(0, 256, 54).astype(np.uint16)
    model = arrays_to_model(arrays, CFG).eval()
    t = torch.from_numpy(tokens.astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 16):  # windows 0, 16, 32, 48 (the last has 5)
            x = t[start : start + 16]
            y = t[start + 1 : start + 17]
            x = x[: len(y)]
            logits, _ = model(x[None])
            total += -F.log_softmax(logits[0], -1)[torch.arange(len(y)), y].sum().item()
            count += len(y)
    for batch_size in (1, 3, 8):
        r = evaluate(arrays, CFG, tokens, seq_len=16, batch_size=batch_size, device="cpu")
        assert r.tokens == count == 53
        assert r.loss_sum == pytest.approx(total, rel=1e-5)
        assert r.mean_loss == pytest.approx(total / count, rel=1e-5)


def test_rejects_too_few_tokens_and_long_windows():
    arrays = init_arrays(CFG, 0)
    with pytest.raises(ValueError):
        evaluate(arrays, CFG, np.zeros(1, np.uint16), seq_len=8, batch_size=2, device="cpu")
    with pytest.raises(ValueError):
        evaluate(arrays, CFG, np.zeros(100, np.uint16), seq_len=32, batch_size=2, device="cpu")

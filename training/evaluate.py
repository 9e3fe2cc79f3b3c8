"""Held-out loss of a set of weights on a token range (eval shards, validation curves)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from training.device import autocast, pick_device
from training.model import GPTConfig
from training.state import arrays_to_model

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """``loss_sum`` (nats, summed over tokens), ``tokens`` predicted, and their mean."""

    loss_sum: float
    tokens: int
    mean_loss: float


@torch.no_grad()
def evaluate(
    arrays: Mapping[str, np.ndarray],
    cfg: GPTConfig,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Cross-entropy of ``arrays`` on ``tokens``, scoring every token after the first once.

    The tokens are cut into non-overlapping windows: window ``i`` reads
    ``tokens[i*seq_len : (i+1)*seq_len]`` and predicts the same positions shifted by one;
    a last, shorter window covers the remainder. So ``tokens == len(tokens) - 1``; results
    of several eval shards combine as ``sum(loss_sum) / sum(tokens)``.

    Raises
    ------
    ValueError
        If there are fewer than 2 tokens or ``seq_len`` exceeds ``block_size``.
    """
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    if not 1 <= seq_len <= cfg.block_size:
        raise ValueError(f"seq_len {seq_len} must be in 1..block_size ({cfg.block_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else pick_device("auto")
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    model = arrays_to_model(arrays, cfg, dev)
    model.eval()

    n_pred = data.numel() - 1
    n_full = n_pred // seq_len
    loss_sum = 0.0
    for b0 in range(0, n_full, batch_size):
        rows = torch.arange(b0, min(b0 + batch_size, n_full))[:, None] * seq_len  # (B, 1)
        window = data[rows + torch.arange(seq_len + 1)[None, :]]  # (B, T+1)
        loss_sum += _loss_sum(model, window, dev)
    if n_full * seq_len < n_pred:  # the remainder, as one shorter window
        loss_sum += _loss_sum(model, data[n_full * seq_len :][None, :], dev)
    return EvalResult(loss_sum=loss_sum, tokens=n_pred, mean_loss=loss_sum / n_pred)


def _loss_sum(model: torch.nn.Module, window: torch.Tensor, dev: torch.device) -> float:
    window = window.to(dev)
    x, y = window[:, :-1], window[:, 1:]
    with autocast(dev):
        logits, _ = model(x)
    logits = logits.float().reshape(-1, logits.size(-1))  # (B*T, vocab_size)
    loss = F.cross_entropy(logits, y.reshape(-1), reduction="sum")
    return float(loss.item())

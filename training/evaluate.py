"""Held-out loss of a set of weights on a token range (eval shards, validation curves)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from training.device import autocast, pick_device
from training.families import ModelSpec
from training.model_cache import ModelCache
from training.state import arrays_to_model

__all__ = ["EvalResult", "eval_windows", "evaluate", "evaluate_model", "window_losses"]


@dataclass(frozen=True)
class EvalResult:
    """``loss_sum`` (nats, summed over tokens), ``tokens`` predicted, and their mean;
    ``window_loss[i]`` is the loss summed over window ``i`` (``eval_windows``), float64, so
    ``loss_sum == window_loss.sum()``: an eval reply commits to these and the coordinator
    recomputes a sample of them (``coordinator.eval_checks``)."""

    loss_sum: float
    tokens: int
    mean_loss: float
    window_loss: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False)


@torch.no_grad()
def evaluate(
    arrays: Mapping[str, np.ndarray],
    cfg: ModelSpec,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device | str | None = None,
    models: ModelCache | None = None,
    checkpointing: bool = False,
) -> EvalResult:
    """Cross-entropy of ``arrays`` on ``tokens``, scoring every token after the first once.

    With ``models``, the model the train leases keep (``ModelCache``, key ``checkpointing``
    included) is refilled with ``arrays`` and scored, eager: a warm node's eval lease then
    builds nothing and holds no second copy of the weights on its device. The numbers are
    those of a fresh build (same weights, same forward).

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
    model = (arrays_to_model(arrays, cfg, dev) if models is None
             else models.load(arrays, cfg, dev, checkpointing=checkpointing).module)
    return evaluate_model(model, tokens, seq_len=seq_len, batch_size=batch_size, device=dev)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, tokens: np.ndarray, *, seq_len: int,
                   batch_size: int, device: torch.device) -> EvalResult:
    """``evaluate`` with a model already built and filled (one a caller reuses: building a
    small model costs about as much as scoring 4,096 tokens with it); leaves it in eval
    mode."""
    model.eval()
    dev = device
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_pred = data.numel() - 1
    n_full = n_pred // seq_len
    sums: list[np.ndarray] = []
    for b0 in range(0, n_full, batch_size):
        rows = torch.arange(b0, min(b0 + batch_size, n_full))[:, None] * seq_len  # (B, 1)
        window = data[rows + torch.arange(seq_len + 1)[None, :]]  # (B, T+1)
        sums.append(_window_sums(model, window, dev))
    if n_full * seq_len < n_pred:  # the remainder, as one shorter window
        sums.append(_window_sums(model, data[n_full * seq_len :][None, :], dev))
    window_loss = np.concatenate(sums)
    loss_sum = float(window_loss.sum())
    return EvalResult(loss_sum=loss_sum, tokens=n_pred, mean_loss=loss_sum / n_pred,
                      window_loss=window_loss)


def eval_windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """The windows ``evaluate`` cuts ``n_tokens`` tokens into, as (start, end) offsets of
    the tokens each reads (``end - start - 1`` predictions; neighbours share one token)."""
    n_pred = n_tokens - 1
    return [(s, min(s + seq_len, n_pred) + 1) for s in range(0, max(n_pred, 0), seq_len)]


@torch.no_grad()
def window_losses(
    arrays: Mapping[str, np.ndarray],
    cfg: ModelSpec,
    tokens: np.ndarray,
    windows: list[int],
    *,
    seq_len: int,
    device: torch.device | str = "cpu",
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """The loss sums ``evaluate(arrays, cfg, tokens, ...)`` would report for the windows
    numbered ``windows`` (``window_loss[windows]``), computing only those: how the coordinator
    checks an eval reply's commitments at a small fraction of the node's cost. ``model``:
    ``arrays`` already built (``arrays_to_model``) on ``device``, for a caller checking
    many replies on one version."""
    cuts = eval_windows(len(tokens), seq_len)
    dev = torch.device(device)
    model = arrays_to_model(arrays, cfg, dev) if model is None else model
    model.eval()
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    out = np.zeros(len(windows))
    by_len: dict[int, list[int]] = {}  # windows of one length go through the model together
    for k, i in enumerate(windows):
        s, e = cuts[i]
        by_len.setdefault(e - s, []).append(k)
    for length, ks in by_len.items():
        rows = torch.stack([data[cuts[windows[k]][0]:cuts[windows[k]][0] + length] for k in ks])
        out[ks] = _window_sums(model, rows, dev)
    return out


def _window_sums(model: torch.nn.Module, window: torch.Tensor, dev: torch.device) -> np.ndarray:
    """Loss summed over each row of ``window`` (B, T+1), as float64 (B,)."""
    window = window.to(dev)
    x, y = window[:, :-1], window[:, 1:]
    with autocast(dev):
        logits, _ = model(x)
    logits = logits.float()  # (B, T, vocab_size)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    return loss.view(y.shape).double().sum(dim=1).cpu().numpy()

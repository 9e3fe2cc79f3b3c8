"""The DiLoCo inner loop: H steps of AdamW from the base weights on one shard of tokens.

Each call starts from a fresh optimizer (nodes keep no state between leases) and returns
the pseudo-gradient ``base - local``, which the coordinator averages and feeds to its
outer optimizer. Batches are drawn from ``seed`` alone, so on CPU the same base, tokens
and seed give a bit-identical pseudo-gradient (given the same torch build and thread count),
whether the model is built for the call or refilled from a warm worker's
``training.model_cache.ModelCache``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.device import pick_device
from training.families import ModelSpec
from training.model_cache import ModelCache, build, forward_backward
from training.state import arrays_to_model, load_arrays

__all__ = [
    "InnerResult", "check_inner_args", "first_batch_loss", "inner_optimizer", "inner_result",
    "pseudo_gradient", "sample_batch", "train_inner",
]

GRAD_CLIP = 1.0
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class InnerResult:
    """What one inner loop produced.

    ``loss_before`` is the loss of the base weights on the first batch, in fp32 even where
    training runs under bf16 autocast: the coordinator recomputes it on its CPU to check the
    work started from the lease's base (``first_batch_loss``), and fp32 CPU and CUDA agree to
    about 1e-6 nats where bf16 differs by up to ~1e-3. One extra forward pass of one batch.
    ``loss_after`` is the mean loss over the last quarter of the steps (at most 10, at least
    1), each measured on a fresh batch just before its update; it estimates the local
    model's loss without an extra forward pass and without re-scoring a batch the model has
    already trained on.
    ``tokens`` counts the predicted (trained-on) tokens: ``steps * batch_size * seq_len``.
    ``opt_state`` is the inner AdamW's state at the end (``keep_opt_state`` only).
    """

    pseudo_grad: dict[str, np.ndarray]
    loss_before: float
    loss_after: float
    tokens: int
    steps: int
    wall_s: float
    opt_state: dict[str, Any] | None = None


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows of ``seq_len + 1`` tokens at uniform random offsets.

    Returns inputs and next-token targets, both (batch_size, seq_len) int64 on data's device.
    """
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # (B, T+1)
    window = data[idx.to(data.device)]
    return window[:, :-1], window[:, 1:]


def inner_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    # Constant lr, no warm-up: a per-lease warm-up + cosine decay measured worse on the demo
    # setup (bench/diloco_sim.py); a schedule across rounds is the coordinator's, through
    # each lease's lr. Weight decay on matrices and embeddings only, not gains and biases.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # the fused kernel exists for CUDA only
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=fused)


def train_inner(
    base: Mapping[str, np.ndarray],
    cfg: ModelSpec,
    tokens: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    opt_state: dict[str, Any] | None = None,
    keep_opt_state: bool = False,
    models: ModelCache | None = None,
    checkpointing: bool = False,
) -> InnerResult:
    """Train ``steps`` AdamW steps from ``base`` on ``tokens`` and return base - local.

    Parameters
    ----------
    progress
        Called as ``progress(step, steps, tokens_done)`` after each step (step is 1-based).
    opt_state, keep_opt_state
        Start AdamW from an earlier lease's state (DiLoCo's workers keep theirs across
        rounds) and return the state at the end. Nodes start fresh: ``bench/diloco_sim.py
        --keep-inner-state`` measured 0.998 of the final loss (noise), and a node's update
        would depend on its history, which no spot check can reproduce.
    models
        Reuse (and, on CUDA, compile once) the model this cache holds for ``cfg`` instead
        of building one; None builds a fresh model, uncompiled.
    checkpointing
        Recompute each block's activations in the backward pass instead of keeping them:
        less memory for about one more forward pass per step; the same pseudo-gradient up
        to float rounding.

    Raises
    ------
    ValueError
        If the shard is shorter than ``seq_len + 1`` tokens, ``seq_len`` exceeds the
        model's ``block_size``, or a count is not positive.
    """
    check_inner_args(cfg, len(tokens), steps=steps, batch_size=batch_size, seq_len=seq_len)
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else pick_device("auto")
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(dev)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same batches on any device
    losses: list[float] = []

    # fork_rng + manual_seed: dropout (if any) is seeded too, and the caller's RNG untouched.
    cuda_ids = []
    if dev.type == "cuda":
        cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)
        if models is None:
            built = build(base, cfg, dev, checkpointing=checkpointing)
        else:
            built = models.load(base, cfg, dev, checkpointing=checkpointing)
        model = built.module
        model.train()
        opt = inner_optimizer(model, lr, weight_decay, dev)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            for group in opt.param_groups:  # the lease's hyperparameters, not the old ones
                group["lr"] = lr
        x, y = sample_batch(data, batch_size, seq_len, gen)
        # eager, not the compiled forward: one pass, and the fp32 numbers the coordinator's
        # recomputation (first_batch_loss) gives
        loss_before = _fp32_loss(model, x, y)
        for step in range(1, steps + 1):
            if step > 1:
                x, y = sample_batch(data, batch_size, seq_len, gen)
            loss = forward_backward(built, x, y, dev)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress is not None:
                progress(step, steps, step * batch_size * seq_len)

    return inner_result(base, model, loss_before, losses, tokens=steps * batch_size * seq_len,
                        t0=t0, opt_state=copy.deepcopy(opt.state_dict()) if keep_opt_state
                        else None)


def inner_result(base: Mapping[str, np.ndarray], model: torch.nn.Module, loss_before: float,
                 losses: Sequence[float], *, tokens: int, t0: float,
                 opt_state: dict[str, Any] | None = None) -> InnerResult:
    """The ``InnerResult`` of a lease whose steps' losses were ``losses``, its trained
    model ``model`` (one process or rank 0 of a data-parallel lease: the same numbers)."""
    steps = len(losses)
    tail = losses[-max(1, min(10, steps // 4)):]
    return InnerResult(
        pseudo_grad=pseudo_gradient(base, model),
        loss_before=loss_before,
        loss_after=math.fsum(tail) / len(tail),
        tokens=tokens,
        steps=steps,
        wall_s=time.perf_counter() - t0,
        opt_state=opt_state,
    )


def pseudo_gradient(base: Mapping[str, np.ndarray], model: torch.nn.Module
                    ) -> dict[str, np.ndarray]:
    """``base - local`` per parameter name (a tied head once), float32 on the host.

    Subtracted where the model lives, one parameter at a time: a GPU node copies the
    base up and the difference down instead of copying the whole model down and subtracting
    on the host, which for 113M parameters cost ~0.25 s of host copies and arithmetic per
    lease (the same IEEE subtraction either way: the same bits).
    """
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            base_np = np.asarray(base[name], dtype=np.float32)
            local = p.detach().float()
            if local.device.type == "cpu":
                out[name] = base_np - local.numpy()
                continue
            with warnings.catch_warnings():  # a read-only view of the blob: only read here
                warnings.simplefilter("ignore", UserWarning)
                up = torch.from_numpy(base_np).to(p.device)
            out[name] = (up - local).cpu().numpy()
    return out


def check_inner_args(cfg: ModelSpec, n_tokens: int, *, steps: int, batch_size: int,
                     seq_len: int) -> None:
    """Raise ``ValueError`` for the arguments ``train_inner`` refuses (see there)."""
    if steps < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"steps, batch_size, seq_len must be >= 1, got {steps}, {batch_size}, {seq_len}"
        )
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {cfg.block_size}")
    if n_tokens < seq_len + 1:
        raise ValueError(
            f"shard has {n_tokens} tokens; need at least seq_len + 1 = {seq_len + 1}"
        )


def first_batch_loss(
    base: Mapping[str, np.ndarray],
    cfg: ModelSpec,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    device: torch.device | str = "cpu",
    model: torch.nn.Module | None = None,
) -> float:
    """The loss ``train_inner`` reports as ``loss_before`` for the same arguments: ``base``
    on the first batch ``seed`` draws from ``tokens``, in fp32, without training.

    One forward pass of one batch: the coordinator uses it to check that a node's work
    started from the lease's base model (``coordinator.verify.rules.base_mismatch``).
    ``model``: a built model of ``cfg`` on ``device`` to fill with ``base`` and reuse
    (building a small one costs more than the pass).
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"shard has {len(tokens)} tokens; need at least seq_len + 1 = {seq_len + 1}"
        )
    dev = torch.device(device)
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(dev)
    gen = torch.Generator().manual_seed(seed)  # as train_inner: the same first batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = arrays_to_model(base, cfg, dev) if model is None else load_arrays(model, base)
        x, y = sample_batch(data, batch_size, seq_len, gen)
        return _fp32_loss(model, x, y)


def _fp32_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The model's loss on one batch, without autocast, gradients or dropout (eval mode:
    no random masks that CPU and CUDA would draw differently); leaves it in train mode."""
    model.eval()
    with torch.no_grad():
        _, loss = model(x, y)
    model.train()
    return float(loss.item())

"""Model <-> named float32 numpy arrays, the form in which weights travel and are stored."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from training.model import GPT, GPTConfig

__all__ = ["model_to_arrays", "arrays_to_model", "init_arrays"]


def model_to_arrays(model: GPT) -> dict[str, np.ndarray]:
    """Copy every parameter to a float32 numpy array, keyed by its parameter name.

    The tied output head appears once, as ``transformer.wte.weight``.
    """
    return {
        name: p.detach().to("cpu", torch.float32).numpy().copy()
        for name, p in model.named_parameters()
    }


def arrays_to_model(
    arrays: Mapping[str, np.ndarray], cfg: GPTConfig, device: torch.device | str = "cpu"
) -> GPT:
    """Build a ``GPT(cfg)`` on ``device`` holding exactly ``arrays``.

    Raises
    ------
    ValueError
        If names or shapes do not match the architecture of ``cfg``.
    """
    model = GPT(cfg)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"arrays do not match the model: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            a = np.asarray(arrays[name])
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(
                    f"array {name!r} has shape {a.shape}, model expects {tuple(p.shape)}"
                )
            # torch.tensor copies: ``a`` may be a read-only view a warm worker shares
            p.copy_(torch.tensor(a, dtype=torch.float32))
    return model.to(device)


def init_arrays(cfg: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """The initial weights of ``GPT(cfg)`` for ``seed``, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_to_arrays(GPT(cfg))

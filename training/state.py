"""Model <-> named float32 numpy arrays, the form in which weights travel and are stored.

Any family of ``training.families``: ``cfg`` is a ``GPTConfig`` or an ``HFSpec``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from training.families import ModelSpec, build_model

__all__ = ["model_to_arrays", "arrays_to_model", "load_arrays", "init_arrays"]


def model_to_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy every parameter to a float32 numpy array, keyed by its parameter name.

    The tied output head appears once, under the embedding's name (``transformer.wte.weight``
    for GPT, ``model.embed_tokens.weight`` for llama and qwen2, ``transformer.wte.weight`` for
    gpt2): ``named_parameters()`` lists a shared ``Parameter`` once.
    """
    out = {}
    for name, p in model.named_parameters():
        host = p.detach().to("cpu", torch.float32)
        # ``to`` returns the parameter itself when it already is a CPU float32 tensor: copy
        # that one (the array must not change with the model); a device's is a new tensor
        out[name] = (host.clone() if host.data_ptr() == p.data_ptr() else host).numpy()
    return out


def arrays_to_model(
    arrays: Mapping[str, np.ndarray], cfg: ModelSpec, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Build the model ``cfg`` describes on ``device`` holding exactly ``arrays`` (a tied
    head stays tied: it is the embedding's parameter, filled once).

    Raises
    ------
    ValueError
        If names or shapes do not match the architecture of ``cfg``.
    """
    return load_arrays(build_model(cfg), arrays).to(device)


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Fill every parameter of ``model`` from ``arrays`` (one array per name of
    ``named_parameters()``, so a tied head is filled once) and return ``model``.

    Raises
    ------
    ValueError
        If names or shapes do not match the model's parameters.
    """
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
    return model


def init_arrays(cfg: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """The initial weights of the model ``cfg`` describes for ``seed``, without touching the
    global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_to_arrays(build_model(cfg))

"""A checkpoint's arrays as a ``transformers`` causal LM, in memory: what an export writes
(``coordinator.export.hf``) and what a node's task eval lease measures (``training.evals``).

The llama, qwen2 and gpt2 families already carry the transformers parameter names
(``training.causal_lm``): the model is built from the arch and the arrays go in as they are.
The built-in **gpt** family (``training.model.GPT``) becomes a ``GPT2LMHeadModel`` that computes
the same function (the tests compare logits: equal to float rounding, 0.0 measured on CPU):

===========================  =================================  ==============================
training.model.GPT           GPT2LMHeadModel                    conversion
===========================  =================================  ==============================
pre-LN blocks, ln_f          pre-LN blocks, ln_f                names are GPT-2's already
``nn.Linear`` c_attn,        ``Conv1D`` (weight ``(in, out)``)  weights transposed
c_proj, c_fc, mlp.c_proj
``bias=False``               biases everywhere                  zero biases (LayerNorm too)
``nn.GELU()`` (erf)          ``activation_function="gelu"``     not GPT-2's ``gelu_new`` (tanh)
``nn.LayerNorm`` eps 1e-5    ``layer_norm_epsilon=1e-5``
SDPA, scale 1/sqrt(hs)       ``scale_attn_weights=True``        nothing per layer
tied wte / lm_head           ``tie_word_embeddings=True``
wpe of ``block_size``        ``n_positions=block_size``
MLP 4 x n_embd               ``n_inner=4 * n_embd``
``dropout``                  attn / resid / embd pdrop          the same value
===========================  =================================  ==============================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import transformers

from protocol.errors import CheckpointError
from training.families import ArchError, HFSpec, ModelSpec, hf_model, spec_from_arch
from training.model import GPTConfig
from training.state import load_arrays

__all__ = ["gpt2_config", "gpt_to_gpt2", "to_transformers"]

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
           ".mlp.c_proj.weight")


def gpt2_config(cfg: GPTConfig) -> transformers.GPT2Config:
    """The ``GPT2Config`` of the model that computes what ``GPT(cfg)`` computes."""
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.n_embd,
        activation_function="gelu", layer_norm_epsilon=1e-5, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def gpt_to_gpt2(arrays: Mapping[str, np.ndarray], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """``GPT(cfg)``'s arrays under ``GPT2LMHeadModel``'s names and layouts: Linear weights
    transposed to Conv1D's ``(in, out)``, and zero biases where ``cfg.bias`` is off."""
    n, inner = cfg.n_embd, 4 * cfg.n_embd
    out = {name: np.ascontiguousarray(a.T if name.endswith(_CONV1D) else a, dtype=np.float32)
           for name, a in arrays.items()}
    widths = {"ln_1": n, "attn.c_attn": 3 * n, "attn.c_proj": n, "ln_2": n, "mlp.c_fc": inner,
              "mlp.c_proj": n}
    biases = {f"transformer.h.{i}.{m}.bias": w for i in range(cfg.n_layer)
              for m, w in widths.items()}
    biases["transformer.ln_f.bias"] = n
    for name, width in biases.items():
        out.setdefault(name, np.zeros(width, dtype=np.float32))
    return out


def to_transformers(arrays: Mapping[str, np.ndarray], arch: Mapping[str, Any]) -> tuple[
        Any, ModelSpec]:
    """The ``transformers`` causal LM holding a checkpoint's ``arrays`` (its meta's
    ``"model"`` is ``arch``), in eval mode with the KV cache on; and the arch's spec.

    Raises
    ------
    CheckpointError
        If the arch is not one this network builds, or the arrays do not fit it.
    """
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"checkpoint meta names no model architecture (got {arch!r})")
    try:
        spec = spec_from_arch(arch)
    except ArchError as err:
        raise CheckpointError(f"checkpoint meta names a model this network does not build: "
                              f"{err}") from None
    if isinstance(spec, HFSpec):
        model, named = hf_model(spec), arrays
    else:
        model = transformers.AutoModelForCausalLM.from_config(
            gpt2_config(spec), attn_implementation="sdpa", dtype=torch.float32)
        named = gpt_to_gpt2(arrays, spec)
    try:
        load_arrays(model, named)
    except ValueError as err:
        raise CheckpointError(f"checkpoint weights do not fit their model: {err}") from None
    model.config.use_cache = True  # trained without; generating wants it
    return model.eval(), spec

"""A model version as a ``transformers`` model, its tokenizer and its generation defaults.

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

Generation defaults (``generation_config.json``): greedy (``do_sample=False``: a reader gets
the same text as the card's author; pass ``do_sample=True, temperature=...`` to sample),
``max_new_tokens = min(128, block_size // 2)`` (a prompt plus that many tokens fits the
positions of gpt and gpt2 models), and the tokenizer's end-of-text id as ``eos_token_id`` and
``pad_token_id`` when it has one (the byte tokenizer has none: generation runs to
``max_new_tokens``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import transformers

from protocol.errors import CheckpointError, ConfigError
from training import tokenizer as tk
from training.corpus import CorpusInfo
from training.families import ArchError, HFSpec, ModelSpec, hf_model, spec_from_arch
from training.model import GPTConfig
from training.state import load_arrays

__all__ = ["MAX_NEW_TOKENS", "check_vocab", "generation_config", "gpt2_config", "gpt_to_gpt2",
           "hf_tokenizer", "to_transformers", "transformers_model"]

MAX_NEW_TOKENS = 128
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


def hf_tokenizer(corpus: CorpusInfo, block_size: int) -> Any:
    """The run's tokenizer as a ``PreTrainedTokenizerFast`` (checked against the SHA-256
    corpus.json records; a format-1 corpus's byte tokens as the byte tokenizer.json).

    Raises
    ------
    ConfigError
        If tokenizer.json is missing, changed or unreadable.
    """
    if corpus.tokenizer_sha256:
        return tk.hf_tokenizer(corpus.tokenizer_path, corpus.tokenizer_sha256,
                               model_max_length=block_size)
    from transformers import PreTrainedTokenizerFast

    tok = tk.parse_tokenizer(tk.byte_tokenizer_json(), "byte tokenizer")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=block_size)


def check_vocab(tokenizer: Any, model_vocab: int) -> None:
    """Refuse a tokenizer with ids the model has no embedding for.

    Raises
    ------
    ConfigError
        If the tokenizer's vocabulary is larger than the model's.
    """
    if len(tokenizer) > model_vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer):,} ids but the model's vocabulary "
                          f"is {model_vocab:,}: its text would index past the embedding")


def generation_config(tokenizer: Any, block_size: int) -> transformers.GenerationConfig:
    """The defaults the module docstring describes."""
    eos = tokenizer.eos_token_id
    return transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max(1, min(MAX_NEW_TOKENS, block_size // 2)),
        eos_token_id=eos, pad_token_id=eos, bos_token_id=tokenizer.bos_token_id)


def transformers_model(arrays: Mapping[str, np.ndarray], arch: Mapping[str, Any],
                       corpus: CorpusInfo) -> tuple[Any, Any, ModelSpec]:
    """A checkpoint as what an export writes, in memory: the transformers model with its
    generation defaults, the run's tokenizer, and the arch's spec. ``export-model`` saves
    them; ``eval-tasks`` (coordinator.evals) evaluates them without writing a file.

    Raises
    ------
    CheckpointError
        As ``to_transformers``.
    ConfigError
        As ``hf_tokenizer`` and ``check_vocab``.
    """
    model, spec = to_transformers(arrays, arch)
    tokenizer = hf_tokenizer(corpus, spec.block_size)
    check_vocab(tokenizer, spec.vocab_size)
    model.generation_config = generation_config(tokenizer, spec.block_size)
    return model, tokenizer, spec

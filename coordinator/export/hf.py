"""A model version as a ``transformers`` model, its tokenizer and its generation defaults.

The model itself comes from ``training.hf_convert`` (the built-in **gpt** family becomes a
``GPT2LMHeadModel`` computing the same function; its docstring has the mapping).

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
import transformers

from protocol.errors import ConfigError
from training import tokenizer as tk
from training.corpus import CorpusInfo
from training.families import ModelSpec
from training.hf_convert import gpt2_config, gpt_to_gpt2, to_transformers

__all__ = ["MAX_NEW_TOKENS", "check_vocab", "generation_config", "gpt2_config", "gpt_to_gpt2",
           "hf_tokenizer", "to_transformers", "transformers_model"]

MAX_NEW_TOKENS = 128


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

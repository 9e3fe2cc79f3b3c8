"""A transformers causal LM behind the built-in GPT's interface.

``forward(idx, targets) -> (logits, loss)`` with GPT's loss: ``targets`` are already the next
tokens (``training.inner.sample_batch`` gives ``y = x`` shifted by one), so the transformers
model is called without ``labels`` (which it would shift a second time) and the loss is the
same fp32 mean cross-entropy GPT computes, so losses of the two families compare.

The transformers model's own modules are registered here under their own names (``model`` and
``lm_head``, or ``transformer`` and ``lm_head`` for GPT-2), so the parameter names, the names
the weights travel under, are the transformers checkpoint names; a tied head is the embedding's
own ``Parameter`` and ``named_parameters()`` lists it once, under the embedding's name.
Built by ``training.families.build_model`` only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from training.model import next_token_loss

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    def __init__(self, hf: Any, block_size: int) -> None:
        super().__init__()
        self.body_name = hf.base_model_prefix  # "model" (llama, qwen2) or "transformer" (gpt2)
        self.add_module(self.body_name, getattr(hf, self.body_name))
        self.lm_head = hf.get_output_embeddings()
        self.config = hf.config
        self.block_size = block_size

    def activation_checkpointing_enable(self) -> None:
        """transformers' own activation checkpointing on the body's layers, non-reentrant
        (the form torch.compile traces, and that needs no input requiring grad)."""
        body = getattr(self, self.body_name)
        kwargs = {"use_reentrant": False}
        if hasattr(body, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            body.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when targets are given.

        ``idx`` and ``targets`` are (B, T) int64; targets equal to -1 are ignored.
        """
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.block_size}")
        body = getattr(self, self.body_name)
        hidden = body(input_ids=idx, use_cache=False).last_hidden_state  # (B, T, width)
        logits = self.lm_head(hidden)  # (B, T, vocab_size)
        return logits, None if targets is None else next_token_loss(logits, targets)

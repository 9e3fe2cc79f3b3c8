"""Training: a nanoGPT-style model, byte tokenizer, corpus and shards, the DiLoCo inner
loop, evaluation and checkpoints. Used by both the coordinator and the nodes.

Modules (import them directly; this package imports nothing so that numpy-only users,
such as the coordinator reading a corpus or a checkpoint, never pay for ``import torch``)::

    model       GPTConfig, PRESETS, GPT                       (torch)
    families    spec_from_arch, run_spec, arch_of, build_model, param_count: GPT or a
                transformers llama / qwen2 / gpt2 from its config (torch, transformers lazily)
    causal_lm   CausalLM: a transformers model behind GPT's forward (torch)
    tokenizer   ByteTokenizer, train_bpe, load_tokenizer, hf_tokenizer, token_dtype
                                                              (numpy; tokenizers on use)
    sources     Source, stdlib_source, open_source: txt/jsonl/parquet/datasets documents
    manifest    check_licence (SPDX), manifest_doc, manifest_bytes (pure Python)
    corpus      build_corpus, build_stdlib_corpus, build_folder_corpus, load_corpus,
                CorpusInfo                                    (numpy)
    shards      Shard, make_shards, data_digest               (numpy)
    state       model_to_arrays, arrays_to_model, init_arrays (torch)
    inner       train_inner, InnerResult                      (torch)
    evaluate    evaluate, EvalResult                          (torch)
    checkpoint  save_checkpoint, load_checkpoint              (numpy, safetensors)
    device      pick_device, autocast, set_threads            (torch)
"""

from __future__ import annotations

__all__: list[str] = []

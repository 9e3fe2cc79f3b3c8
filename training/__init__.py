"""Training: a nanoGPT-style model, byte tokenizer, corpus and shards, the DiLoCo inner
loop, evaluation and checkpoints. Used by both the coordinator and the nodes.

Modules (import them directly; this package imports nothing so that numpy-only users,
such as the coordinator reading a corpus or a checkpoint, never pay for ``import torch``)::

    model       GPTConfig, PRESETS, GPT                       (torch)
    tokenizer   ByteTokenizer                                 (numpy)
    corpus      build_stdlib_corpus, build_folder_corpus, load_corpus, CorpusInfo (numpy)
    shards      Shard, make_shards, data_digest               (numpy)
    state       model_to_arrays, arrays_to_model, init_arrays (torch)
    inner       train_inner, InnerResult                      (torch)
    evaluate    evaluate, EvalResult                          (torch)
    checkpoint  save_checkpoint, load_checkpoint              (numpy, safetensors)
    device      pick_device, autocast, set_threads            (torch)
"""

from __future__ import annotations

__all__: list[str] = []

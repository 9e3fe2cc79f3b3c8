"""A tasks lease's work: lm-evaluation-harness tasks on the lease's base version.

The lease names three blobs, each checked against its digest before this runs: the version's
arrays, the task bundle (``training.evals.bundle``) and the run's tokenizer.json. The version
becomes the transformers model an export would write (``training.hf_convert``), the bundle a
folder of tasks in a temporary directory (checked again here, as the coordinator checked it),
and lm-eval answers every request (``training.evals.answers``): those answers, not scores, are
what the node signs and sends. lm-eval comes with ``pip install 'atom-network[evals]'``; a
node without it fails the lease with that line, and the coordinator notes it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import ConfigError
from training import tokenizer as tk
from training.evals.answers import answer_tasks
from training.evals.bundle import unpack_tasks
from training.evals.harness import require_harness, rngs_kept

__all__ = ["run_task_lease"]


def run_task_lease(arrays: Mapping[str, np.ndarray], arch: Mapping[str, Any], bundle: bytes,
                   tokenizer_json: bytes, *, device: Any, batch_size: int
                   ) -> tuple[dict[str, np.ndarray], int]:
    """The answers of the version ``arrays`` (of architecture ``arch``) to every request of the
    bundle's tasks, and the tokens they took.

    Raises
    ------
    AtomError
        lm-eval is not installed or fails; the bundle, the tokenizer or the arrays are bad.
    """
    require_harness()
    from training.hf_convert import to_transformers  # torch, transformers: past the checks

    with tempfile.TemporaryDirectory(prefix="atom-tasks-") as folder, rngs_kept():
        tasks = unpack_tasks(bundle, Path(folder))
        model, spec = to_transformers(arrays, arch)
        try:
            text = tokenizer_json.decode()
        except UnicodeDecodeError:
            raise ConfigError("the run's tokenizer blob is not UTF-8 JSON") from None
        tokenizer = tk.wrap_tokenizer(tk.parse_tokenizer(text, "the run's tokenizer"),
                                      model_max_length=spec.block_size)
        if len(tokenizer) > spec.vocab_size:
            raise ConfigError(f"the run's tokenizer has {len(tokenizer):,} ids, the model's "
                              f"vocabulary {spec.vocab_size:,}")
        model.to(device)
        return answer_tasks(model, tokenizer, tasks, max_length=spec.block_size,
                            batch_size=batch_size, device=str(device))

"""Running lm-evaluation-harness on a model held in memory, offline.

``run_tasks`` hands the transformers model and tokenizer an export would write
(``coordinator.export.hf.transformers_model``) to lm-eval's ``HFLM`` and runs the task folder's
configs (``training.evals.tasks``) with ``simple_evaluate``; nothing is written but the
datasets cache of the JSONL files, in a temporary folder removed afterwards. What it does
beyond calling lm-eval, and why:

- ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are on while it runs
  (and the flags the hub and datasets read at import, where they were imported before);
- only the given configs are indexed (``TaskManager(include_defaults=False)``): indexing
  lm-eval's bundled tasks took 24 s and reads nothing of ours;
- a tokenizer with no end-of-text token (the byte tokenizer) gets its newline token as
  ``eos_token``: lm-eval prefixes loglikelihood requests with it, and would otherwise add a
  pad token past the model's embedding. Generation then also stops at a newline;
- the export's ``max_new_tokens`` is lifted while it runs, or it would override each task's
  ``max_gen_toks``;
- the global RNGs ``simple_evaluate`` reseeds (random, numpy, torch) are restored after it;
  the seeds are fixed, so a measurement repeats;
- bootstrap resampling for stderrs runs in this process (``DISABLE_MULTIPROC``): lm-eval
  otherwise forks a pool of ``cpu_count()`` processes for it.

lm-eval's results become one ``TaskScore`` per task, metric and filter (``"acc,none"``):
its value and stderr (None where lm-eval gave ``"N/A"`` or a non-finite number), and the
number of documents evaluated.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from protocol.errors import AtomError
from training.evals.tasks import TaskFile

__all__ = ["BOOTSTRAP_ITERS", "SEED", "TaskScore", "eval_tokenizer", "evaluate_lm",
           "harness_name", "require_harness", "rngs_kept", "run_tasks", "scores_of"]

BOOTSTRAP_ITERS = 100  # resamples for the stderr of metrics with no closed form (perplexity)
SEED = 1234  # lm-eval's default seeds, fixed
INSTALL = "pip install 'atom-network[evals]'"
_NEEDED = ("lm_eval", "accelerate", "peft")  # lm_eval[hf]: HFLM imports all three
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
# flags read at import time: (module, attribute)
_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_DATASETS_OFFLINE"))


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    filter: str
    value: float | None
    stderr: float | None
    n_samples: int
    task_digest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_harness() -> None:
    """Refuse early, before a model is built, when lm-eval with its ``hf`` extra is missing.

    Raises
    ------
    AtomError
        If lm_eval, accelerate or peft cannot be imported.
    """
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise AtomError(f"lm-eval is not installed ({', '.join(missing)} missing): {INSTALL}")


def harness_name() -> str:
    """What measured the scores, as the ledger records it: ``lm-eval 0.4.13``."""
    return f"lm-eval {metadata.version('lm_eval')}"


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[TaskFile], *, max_length: int,
              batch_size: int = 4, device: str = "cpu", bootstrap_iters: int = BOOTSTRAP_ITERS,
              seed: int = SEED) -> list[TaskScore]:
    """Every metric of ``tasks`` on ``model`` (a transformers causal LM) and ``tokenizer``,
    by task, metric and filter (module docstring).

    Raises
    ------
    AtomError
        If lm-eval is not installed, or fails on the tasks (the first line of its error).
    """
    def hflm() -> Any:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=eval_tokenizer(tokenizer),
                    batch_size=batch_size, device=device, max_length=max_length)

    with _max_new_tokens_lifted(model):
        results = evaluate_lm(hflm, tasks, bootstrap_iters=bootstrap_iters, seed=seed)
    return scores_of(results, {t.name: t.digest for t in tasks})


def evaluate_lm(make_lm: Callable[[], Any], tasks: Sequence[TaskFile], *,
                bootstrap_iters: int = BOOTSTRAP_ITERS, seed: int = SEED,
                samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` results of ``tasks`` (only the documents ``samples``
    names per task, when given) on the lm-eval model ``make_lm()`` builds, run offline, quiet,
    with fixed seeds and the global RNGs restored (module docstring).

    Raises
    ------
    AtomError
        If lm-eval is not installed, or fails on the tasks (the first line of its error; an
        ``AtomError`` raised inside, e.g. by the model, as it is).
    """
    require_harness()
    with tempfile.TemporaryDirectory(prefix="atom-evals-") as cache, _offline(), \
            rngs_kept(), _quiet():
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise AtomError(f"lm-eval cannot be imported ({exc}): {INSTALL}") from None
        _flags_on()  # datasets may have been imported just now
        configs = [dict(t.config, dataset_kwargs={**t.config["dataset_kwargs"],
                                                  "cache_dir": cache}) for t in tasks]
        try:
            results = lm_eval.simple_evaluate(
                model=make_lm(), tasks=configs, task_manager=TaskManager(include_defaults=False),
                log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                samples=samples)
        except AtomError:
            raise
        except Exception as exc:  # lm-eval's own checks raise anything: one line for the user
            raise AtomError(f"lm-eval failed: {_first_line(exc)}") from exc
    if results is None:
        raise AtomError("lm-eval returned no results")
    return results


def scores_of(results: dict[str, Any], digests: dict[str, str]) -> list[TaskScore]:
    """``simple_evaluate``'s results as ``TaskScore`` rows for the tasks in ``digests``."""
    out = []
    for task, digest in sorted(digests.items()):
        got = results["results"].get(task)
        if got is None:
            raise AtomError(f"lm-eval reported nothing for task {task!r}")
        n = int(results["n-samples"][task]["effective"])
        for key, value in got.items():
            metric, sep, filter_ = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue  # "alias", and the stderrs, which go with their metric
            out.append(TaskScore(task, metric, filter_, _number(value),
                                 _number(got.get(f"{metric}_stderr,{filter_}")), n, digest))
    return sorted(out, key=lambda s: (s.task, s.metric, s.filter))


def _number(value: Any) -> float | None:
    """lm-eval's numbers (floats, numpy floats, or "N/A") as a finite float or None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def eval_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or a copy with its newline token as end-of-text when it has none
    (module docstring)."""
    if tokenizer.eos_token_id is not None:
        return tokenizer
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise AtomError("the tokenizer has no end-of-text token and no newline token: "
                        "lm-eval needs one to start loglikelihood requests")
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(ids[0])
    return tok


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextmanager
def _offline() -> Iterator[None]:
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved_flags = [(m, a, getattr(sys.modules[m], a)) for m, a in _OFFLINE_FLAGS
                   if m in sys.modules]
    os.environ.update(_OFFLINE_ENV)
    _flags_on()
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # a module first imported inside keeps the offline flag it read then
        for module, attr, value in saved_flags:
            setattr(sys.modules[module], attr, value)


def _flags_on() -> None:
    for module, attr in _OFFLINE_FLAGS:
        if module in sys.modules:
            setattr(sys.modules[module], attr, True)


@contextmanager
def rngs_kept() -> Iterator[None]:
    """The global RNGs of random, numpy and torch as they were before the block."""
    import numpy as np
    import torch

    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO and WARNING lines (a few dozen per run) and datasets' bars off; errors
    and lm-eval's bars over its requests still show."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars_were_off = logger.level, datasets.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


@contextmanager
def _max_new_tokens_lifted(model: Any) -> Iterator[None]:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        yield
        return
    before = gen.max_new_tokens
    gen.max_new_tokens = None
    try:
        yield
    finally:
        gen.max_new_tokens = before

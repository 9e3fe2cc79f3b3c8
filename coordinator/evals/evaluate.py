"""``atom-coordinator eval-tasks``: a model version's scores on a task folder, into the ledger.

The version's checkpoint is read and checked against the ledger as an export reads it
(``coordinator.export.model_dir.read_version``), built into the transformers model and
tokenizer an export would write (``coordinator.export.hf.transformers_model``), and measured
in memory by lm-eval (``coordinator.evals.harness``). The task folder is checked first and
the ledger opened for writing last: a bad task file costs no model load, and a failed
measurement records nothing.

This runs on the coordinator. Running the tasks inside nodes' eval leases, and checking
their answers as eval replies are checked, is a later step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.export.model_dir import read_version
from coordinator.ledger import Ledger
from coordinator.rundir import RunDir
from protocol.errors import ConfigError
from training.corpus import load_corpus
from training.evals.harness import (
    TaskScore,
    harness_name,
    require_harness,
    rngs_kept,
    run_tasks,
)
from training.evals.tasks import load_tasks

__all__ = ["STAGES", "Evaluated", "eval_tasks"]

# what ``on_stage`` is told, in order
STAGES = ("reading the tasks", "reading the version", "building the model", "running lm-eval",
          "recording the scores")


@dataclass(frozen=True)
class Evaluated:
    version: int
    digest: str
    tasks_dir: Path
    harness: str
    scores: tuple[TaskScore, ...]


def eval_tasks(rd: RunDir, *, version: int | None = None, tasks_dir: Path | None = None,
               names: Sequence[str] = (), batch_size: int = 4, device: str = "cpu",
               on_stage: Callable[[str], None] | None = None) -> Evaluated:
    """Measure ``version`` (default: the latest) of ``rd``'s run on the tasks of
    ``tasks_dir`` (default: run.toml's ``[eval] tasks``; all, or those called ``names``) and
    record the scores in the ledger.

    Raises
    ------
    ConfigError
        No task folder is given or configured, a task file or its data is bad, a name is
        not a task of the folder, ``rd`` is not a run directory or its tokenizer changed.
    CheckpointError
        The version is not in the ledger, or its checkpoint is missing, corrupt or not the
        weights the ledger recorded.
    AtomError
        lm-eval is not installed, or fails on the tasks.
    """
    stage = on_stage or (lambda _: None)
    cfg = rd.config()
    folder = tasks_dir if tasks_dir is not None else cfg.eval_tasks(rd.path)
    if folder is None:
        raise ConfigError("no task folder: pass --tasks TASKDIR or set [eval] tasks in "
                          f"{rd.config_path}")
    stage(STAGES[0])
    tasks = load_tasks(folder, names)
    require_harness()
    stage(STAGES[1])
    url = cfg.ledger_url(rd.path)
    with Ledger.read_only(url) as ledger:
        row, arrays, meta = read_version(rd, ledger.versions(), version)
    corpus = load_corpus(rd.corpus, verify=False)
    stage(STAGES[2])
    from coordinator.export.hf import (
        transformers_model,  # torch, transformers: past the checks
    )

    with rngs_kept():  # building a transformers model draws from torch's RNG
        model, tokenizer, spec = transformers_model(arrays, meta.get("model"), corpus)
        stage(STAGES[3])
        scores = run_tasks(model, tokenizer, tasks, max_length=spec.block_size,
                           batch_size=batch_size, device=device)
    stage(STAGES[4])
    harness = harness_name()
    with Ledger(url) as ledger:
        ledger.record_task_scores(row.version, [s.to_dict() for s in scores], harness=harness)
    return Evaluated(row.version, row.digest, folder, harness, tuple(scores))

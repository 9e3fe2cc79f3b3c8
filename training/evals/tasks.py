"""A run's task folder: lm-evaluation-harness task YAML files and the JSONL files they read.

Every ``*.yaml`` / ``*.yml`` file directly in the folder is one task::

    task: atom_mc                      # its name: unique in the folder
    dataset_path: json                 # local JSON lines only: nothing is downloaded
    dataset_kwargs:
      data_files:
        test: mc.jsonl                 # relative to the YAML file's folder
    output_type: multiple_choice
    ...                                # any other key of an lm-eval task config

The folder is checked before a model is loaded, each problem one line naming its file:
YAML that does not parse (lm-eval's ``!function`` tags included: a task folder runs no
code), a file that is not one task (``include:``, a group), a duplicate task name, a
``dataset_path`` other than ``json``, a data file that is missing, remote, or not JSON lines
of objects. ``data_files`` are rewritten to absolute paths: lm-eval would resolve them
against the working directory, not the YAML's.

A task's **digest** is the SHA-256 of the canonical JSON ``{"yaml": <SHA-256 of the YAML
file>, "data": {<split>: [<SHA-256 of each data file>, ...]}}``: it names what was measured,
wherever the folder lies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from protocol._fields import canonical_json
from protocol.errors import ConfigError

__all__ = ["TaskFile", "load_tasks"]

# keys that would make a file something other than one self-contained task
_REFUSED = {"include": "include: is not supported (write each task in one file)",
            "class": "class: is not supported (a task folder runs no code)"}


@dataclass(frozen=True)
class TaskFile:
    name: str
    path: Path  # the YAML file
    config: dict[str, Any]  # its config, data_files absolute: what lm-eval is given
    digest: str  # module docstring


def load_tasks(folder: Path, names: Sequence[str] = ()) -> list[TaskFile]:
    """The tasks of ``folder`` (all of them, or those called ``names``), checked, by name.

    Raises
    ------
    ConfigError
        The folder is missing or holds no task, a task file or its data is bad (module
        docstring), or one of ``names`` is not a task of the folder.
    """
    folder = folder.expanduser()
    if not folder.is_dir():
        raise ConfigError(f"task folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise ConfigError(f"task folder {folder} holds no task (*.yaml) file")
    tasks: dict[str, TaskFile] = {}
    for path in files:
        task = _load(path)
        if task.name in tasks:
            raise ConfigError(f"{path}: task {task.name!r} is also defined in "
                              f"{tasks[task.name].path.name}")
        tasks[task.name] = task
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ConfigError(f"task {unknown[0]!r} is not in {folder} (it has "
                          f"{', '.join(sorted(tasks))})")
    return [tasks[n] for n in sorted(set(names) or tasks)]


def _load(path: Path) -> TaskFile:
    raw = path.read_bytes()
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a task config (a YAML mapping with task: NAME)")
    for key, why in _REFUSED.items():
        if key in doc:
            raise ConfigError(f"{path}: {why}")
    name = doc.get("task")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: task must be the task's name (groups of tasks are not "
                          "supported)")
    if doc.get("dataset_path") != "json":
        raise ConfigError(f"{path}: dataset_path must be json (local JSON lines files), got "
                          f"{doc.get('dataset_path')!r}")
    kwargs = doc.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    splits = _splits(path, files)
    config = dict(doc, dataset_kwargs=dict(kwargs, data_files={
        split: [str(p) for p in ps] for split, ps in splits.items()}))
    digest = hashlib.sha256(canonical_json({
        "yaml": hashlib.sha256(raw).hexdigest(),
        "data": {split: [_check_jsonl(path, p) for p in ps] for split, ps in splits.items()},
    })).hexdigest()
    return TaskFile(name, path, config, digest)


def _splits(path: Path, files: Any) -> dict[str, list[Path]]:
    """``data_files`` as ``{split: [absolute path, ...]}``, each file present and local."""
    if isinstance(files, (str, list)):
        files = {"train": files}  # what datasets calls a split given no name
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"{path}: dataset_kwargs.data_files must name the task's JSONL "
                          "files, e.g. {test: items.jsonl}")
    out = {}
    for split, names in files.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(
                isinstance(n, str) for n in names):
            raise ConfigError(f"{path}: data_files.{split} must be a file name or a list of "
                              "them")
        if any("://" in n for n in names):
            raise ConfigError(f"{path}: data_files.{split} must be local files (nothing is "
                              "downloaded)")
        out[str(split)] = [(path.parent / n).expanduser().absolute() for n in names]
    return out


def _check_jsonl(task: Path, data: Path) -> str:
    """The SHA-256 of ``data``, after checking it is JSON lines of objects."""
    try:
        raw = data.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{task}: data file {data} is missing") from None
    except OSError as exc:
        raise ConfigError(f"{task}: cannot read data file {data}: "
                          f"{exc.strerror or exc}") from None
    n = 0
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{task}: {data.name} line {i} is not a JSON object")
        n += 1
    if not n:
        raise ConfigError(f"{task}: data file {data} holds no record")
    return hashlib.sha256(raw).hexdigest()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1})" if mark is not None else ""
        return f"{exc.problem}{where}"
    return str(exc).splitlines()[0]

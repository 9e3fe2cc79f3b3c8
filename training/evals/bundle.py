"""A task folder as one content-addressed blob, for the eval leases that run it on nodes.

The bytes are the canonical JSON (``protocol._fields.canonical_json``: sorted keys, no
spaces, ASCII) of::

    {"atom_tasks": 1,
     "tasks": [{"yaml_name": "python_mc.yaml", "yaml": "<the YAML file's text>",
                "files": {"python_mc.jsonl": "<the data file's text>", ...}}, ...]}

one entry per task, in task-name order, each data file under the name its YAML gives it
(relative to the YAML's folder). The files travel byte for byte, so a task's digest
(``training.evals.tasks``) is the same on the node as on the coordinator, and the lease names
the bundle by its SHA-256 like any other blob.

A node unpacks each task into a folder of its own and reads it back with ``load_tasks``: the
checks a coordinator's folder passes run again on the node, on exactly these bytes. A name
that would leave its folder (absolute, ``..``) is refused before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from protocol._fields import canonical_json
from protocol.errors import ConfigError, ProtocolError
from training.evals.tasks import TaskFile, load_tasks

__all__ = ["FORMAT", "MAX_TASKS", "pack_tasks", "unpack_tasks"]

FORMAT = 1
MAX_TASKS = 64  # a bundle is a lease's work: a few benchmark tasks, not a library


def pack_tasks(tasks: Sequence[TaskFile]) -> bytes:
    """The bundle of ``tasks`` (already checked by ``load_tasks``).

    Raises
    ------
    ConfigError
        A file is not UTF-8, or a data file lies outside its task's folder (it could not be
        unpacked under the name the YAML gives it).
    """
    if not tasks or len(tasks) > MAX_TASKS:
        raise ConfigError(f"a task bundle holds 1 to {MAX_TASKS} tasks, got {len(tasks)}")
    entries = []
    for t in sorted(tasks, key=lambda t: t.name):
        files = {}
        for paths in t.config["dataset_kwargs"]["data_files"].values():
            for p in paths:
                rel = os.path.relpath(p, t.path.parent)
                if _unsafe(rel):
                    raise ConfigError(f"{t.path}: data file {p} is outside the task's folder: "
                                      "eval leases ship a task with the files beside it")
                files[PurePosixPath(Path(rel)).as_posix()] = _text(Path(p))
        entries.append({"yaml_name": t.path.name, "yaml": _text(t.path), "files": files})
    return canonical_json({"atom_tasks": FORMAT, "tasks": entries})


def unpack_tasks(data: bytes, folder: Path) -> list[TaskFile]:
    """The tasks of bundle ``data``, written under ``folder`` (one sub-folder per task) and
    read back with ``load_tasks``, by name.

    Raises
    ------
    ProtocolError
        The bytes are not a bundle (format, types, a name that would leave its folder).
    ConfigError
        A task fails ``load_tasks``'s checks.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("tasks bundle: not UTF-8 JSON") from None
    _need(isinstance(doc, dict) and doc.get("atom_tasks") == FORMAT
          and set(doc) == {"atom_tasks", "tasks"}, f"not a format-{FORMAT} task bundle")
    entries = doc["tasks"]
    _need(isinstance(entries, list) and 0 < len(entries) <= MAX_TASKS,
          f"tasks must be a list of 1 to {MAX_TASKS} tasks")
    out: list[TaskFile] = []
    for i, e in enumerate(entries):
        _need(isinstance(e, dict) and set(e) == {"yaml_name", "yaml", "files"}
              and isinstance(e["yaml"], str) and isinstance(e["files"], dict)
              and all(isinstance(k, str) and isinstance(v, str) for k, v in e["files"].items()),
              f"task {i} is not {{yaml_name, yaml, files}} of strings")
        name = e["yaml_name"]
        _need(isinstance(name, str) and name.endswith((".yaml", ".yml")) and "/" not in name
              and not _unsafe(name), f"task {i}: yaml_name {str(name)[:80]!r} is not a file name")
        for rel in e["files"]:
            _need(not _unsafe(rel), f"task {i}: data file name {rel[:80]!r} leaves its folder")
        home = folder / str(i)
        for rel, text in e["files"].items():
            path = home / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode())
        home.mkdir(parents=True, exist_ok=True)
        (home / name).write_bytes(e["yaml"].encode())
        tasks = load_tasks(home)
        _need(len(tasks) == 1, f"task {i} is not one task")
        out.append(tasks[0])
    names = [t.name for t in out]
    _need(len(set(names)) == len(names), "two tasks share a name")
    return sorted(out, key=lambda t: t.name)


def _unsafe(rel: str) -> bool:
    p = PurePosixPath(rel.replace("\\", "/"))
    return rel == "" or p.is_absolute() or ".." in p.parts or ":" in rel


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def _need(ok: Any, what: str) -> None:
    if not ok:
        raise ProtocolError(f"tasks bundle: {what}")

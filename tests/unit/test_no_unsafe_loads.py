"""No code path turns received bytes into code: no pickle, no eval/exec, no unsafe torch.load.

Checkpoints are safetensors, arrays are .npy without pickles, records are Flower's; a pickle
(or a ``torch.load`` without ``weights_only=True``) anywhere would make any file or message a
way to run code on a node or the coordinator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("coordinator", "node", "training", "protocol")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
               and k.value.value is True for k in call.keywords)


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unsafe call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
                found.append((node.lineno, f"{name}("))
            elif name.split(".")[-1] in ("load", "loads", "Unpickler") and (
                    name.startswith(("pickle.", "cPickle.", "dill.", "marshal.", "shelve."))):
                found.append((node.lineno, f"{name}("))
            elif name == "torch.load" and not _weights_only(node):
                found.append((node.lineno, "torch.load( without weights_only=True"))
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
                                                        and k.value.value is False)
                       for k in node.keywords):
                    found.append((node.lineno, "np.load(allow_pickle=...)"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve"):
                    found.append((node.lineno, f"import {mod}"))
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = """
import pickle
from dill import loads
x = pickle.load(f)
y = torch.load(p)
z = torch.load(p, weights_only=False)
eval("1")
exec("x = 1")
np.load(f, allow_pickle=True)
"""
    good = "torch.load(p, weights_only=True)\nnp.load(f)\nnp.load(f, allow_pickle=False)\n"
    assert len(unsafe_calls(bad)) == 8
    assert unsafe_calls(good) == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path: Path) -> None:
    assert unsafe_calls(path.read_text()) == []


def test_the_scan_covers_the_source_tree() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"node/worker.py", "coordinator/verify/record.py", "protocol/messages.py",
            "training/checkpoint.py"} <= names

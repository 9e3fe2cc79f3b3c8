"""The headless core never imports the TUI toolkit: only tui/ may import textual."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, json, pkgutil, sys
for name in ("protocol", "training", "coordinator", "node"):
    pkg = importlib.import_module(name)
    for info in pkgutil.walk_packages(pkg.__path__, name + "."):
        if not info.name.endswith("__main__"):  # __main__ runs the CLI
            importlib.import_module(info.name)
core = sorted(m for m in sys.modules if m.split(".")[0] in
              ("protocol", "training", "coordinator", "node"))
print(json.dumps({"core": core,
                  "textual": sorted(m for m in sys.modules if m.split(".")[0] == "textual")}))
"""


def test_core_packages_never_import_textual() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=180)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert "coordinator.services.views" in found["core"] and "node.cli" in found["core"]
    assert found["textual"] == []

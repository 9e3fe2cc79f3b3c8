"""The TUI's status client reads the wire schema (``protocol.view_types``) only: a TUI on a
coordinator's status service never loads the ledger layer (SQLModel, SQLAlchemy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import tui, tui.app, tui.coordinator_source
before = sorted(m for m in sys.modules if m.split(".")[0] in ("coordinator", "sqlmodel", "sqlalchemy"))
from tui import LedgerSource  # `atom-tui --db` does load it
after = sorted(m for m in sys.modules if m.split(".")[0] in ("coordinator", "sqlmodel", "sqlalchemy"))
print(json.dumps({"before": before, "after": after}))
"""


def test_status_client_never_imports_the_ledger() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=180)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["before"] == []
    assert "coordinator.ledger" in found["after"] and "sqlmodel" in found["after"]

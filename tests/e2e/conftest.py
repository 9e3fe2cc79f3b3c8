"""End-to-end tests: real Flower processes on loopback. Every process they start is reaped."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def processes_mentioning(text: str) -> list[int]:
    """PIDs (other than ours) whose command line contains ``text``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(entry.name))
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A run directory; after the test, no process that mentions it may be left alive."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("ATOM_NODE_HOME", str(tmp_path / "node-home"))
    wd = tmp_path / "run"
    yield wd
    # Flower helpers poll their parent and leave within a few seconds of it: allow that much.
    end = time.monotonic() + 5.0
    while (left := processes_mentioning(str(tmp_path))) and time.monotonic() < end:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left running after the test: {left}"

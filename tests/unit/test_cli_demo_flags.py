"""`atom-coordinator demo` passes its flags on to the demo network (the run itself is
tested end to end in tests/e2e)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import coordinator.accounting.report as report
import coordinator.demo as demo
from coordinator.cli import app


@pytest.mark.parametrize(("args", "overrides"), [
    ([], None),
    (["--async"], {"async_enabled": True}),
    (["--ledger", "postgresql+psycopg://x/y", "--async"],
     {"ledger_url": "postgresql+psycopg://x/y", "async_enabled": True}),
])
def test_demo_flags_become_run_toml_overrides(monkeypatch: pytest.MonkeyPatch,
                                              args: list[str], overrides: Any) -> None:
    seen: dict[str, Any] = {}

    def fake_run_demo(**kw: Any) -> tuple[dict[str, Any], str]:
        seen.update(kw)
        return {"seconds": 1.0, "val_loss": [2.0, 1.0]}, "finished:completed"

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo, "demo_ok", lambda summary: None)
    monkeypatch.setattr(report, "render_summary", lambda summary, console: None)
    res = CliRunner().invoke(app, ["demo", "--nodes", "2", "--rounds", "3", *args])
    assert res.exit_code == 0, res.output
    assert (seen["nodes"], seen["rounds"], seen["overrides"]) == (2, 3, overrides)

"""``atom-coordinator status DIR``: the run on one screen, from the fixture ledger and through
the CLI on a run directory."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.ledger import Ledger
from coordinator.rundir import init_run
from coordinator.status_screen import render_status, status
from tests.fixture_ledger import NOW, FixtureRun


@pytest.fixture
def ledger(fixture_ledger: FixtureRun) -> Iterator[Ledger]:
    led = Ledger.read_only(fixture_ledger.url)
    yield led
    led.close()


def test_status_of_the_fixture_run(ledger: Ledger) -> None:
    s = status(ledger, now=NOW, run_id="fixture-run")
    # aurora working, borealis idle, cygnus and draco offline
    assert (s.nodes, s.online, s.working, s.revoked) == (4, 2, 1, 0)
    assert (s.run_id, s.version, s.leases_open) == ("fixture-run", 2, 1)
    assert s.val_loss is not None and s.tokens_per_s > 0
    assert s.rejected >= 1 and s.reasons.get("norm_bound") == 1
    assert s.accepted == sum(1 for u in ledger.updates() if u.verdict == "accepted")
    assert any(kind == "reject" for _, kind, _ in s.errors)
    out = io.StringIO()
    render_status(s, Console(file=out, width=120))
    text = out.getvalue()
    assert "version 2" in text and "4: 2 online (1 working, 1 idle), 2 offline" in text
    assert "norm_bound 1" in text and "last problems" in text


def test_status_cli_on_a_new_run_and_a_missing_one(tmp_path: Path) -> None:
    rd = init_run(tmp_path / "run", run_id="status-test")
    runner = CliRunner()
    res = runner.invoke(app, ["status", str(rd.path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert (data["run_id"], data["version"], data["nodes"], data["errors"]) == (
        "status-test", None, 0, [])
    res = runner.invoke(app, ["status", str(rd.path)])
    assert res.exit_code == 0 and "version none yet" in res.stdout and "problems none" in res.stdout
    res = runner.invoke(app, ["status", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_the_last_problems_are_the_newest(fixture_ledger_copy: FixtureRun) -> None:
    with Ledger(fixture_ledger_copy.url) as led:
        for i in range(8):
            led.add_event("error", f"problem {i}")
        led.add_event("version", "not a problem")
        s = status(led, now=NOW)
    assert [m for _, _, m in s.errors] == [f"problem {i}" for i in range(3, 8)]

"""``atom-tui`` arguments: which view it opens, and one-line errors for every mistake."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixture_ledger import FixtureRun
from tui import app as tui_app_module
from tui.app import ContributorApp, NetworkApp
from tui.cli import app as cli, resolve_source

runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path: Path, fixture_ledger: FixtureRun) -> Path:
    """A run directory as far as the TUI cares: run.toml naming a relative SQLite ledger."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.toml").write_text('[run]\nid = "cli-run"\n\n[ledger]\nurl = "sqlite:///ledger.db"\n')
    shutil.copyfile(fixture_ledger.path, d / "ledger.db")
    return d


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Apps the CLI would have run (instead of taking over the terminal)."""
    apps: list[object] = []
    monkeypatch.setattr(tui_app_module.AtomApp, "run", lambda self, *a, **k: apps.append(self))
    return apps


def home_with(tmp_path: Path, node_id: int) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.json").write_text(json.dumps({
        "node_id": node_id, "flower_node_id": "1002", "name": "borealis",
        "institution": "Beta Institute of Technology", "run_id": "fixture-run",
        "coordinator_address": "127.0.0.1:1", "fleet_address": "127.0.0.1:2"}))
    return home


def test_run_dir_resolves_to_its_ledger_and_run_id(run_dir: Path) -> None:
    url, run_id = resolve_source(run_dir, None)
    assert url == f"sqlite:///{run_dir / 'ledger.db'}" and run_id == "cli-run"


def test_opens_the_network_view(run_dir: Path, started: list[object]) -> None:
    result = runner.invoke(cli, [str(run_dir)])
    assert result.exit_code == 0, result.output
    (app,) = started
    assert isinstance(app, NetworkApp) and app.source.run_id == "cli-run"
    assert app.source.ledger.is_read_only


def test_opens_the_contributor_view(run_dir: Path, started: list[object], tmp_path: Path,
                                    fixture_ledger: FixtureRun) -> None:
    assert runner.invoke(cli, ["--node", "2", str(run_dir)]).exit_code == 0
    home = home_with(tmp_path, 2)
    result = runner.invoke(cli, ["--home", str(home), "--db", fixture_ledger.url])
    assert result.exit_code == 0, result.output
    assert [type(a) for a in started] == [ContributorApp, ContributorApp]
    assert [a.node_id for a in started] == [2, 2]  # type: ignore[attr-defined]


@pytest.mark.parametrize("args, code, message", [
    (["/nonexistent/run"], 2, "is not a run directory"),
    (["--db", "sqlite:////nonexistent/ledger.db"], 7, "cannot open ledger"),
    (["--db", "nonsense://"], 7, "cannot open ledger"),
    (["--coordinator", "127.0.0.1:9093"], 2, "--coordinator needs the coordinator key"),
    (["--coordinator", "127.0.0.1:9093", "--db", "sqlite:///x.db"], 2, "not both"),
    (["--key", "coordinator.key", "--db", "sqlite:///x.db"], 2, "go with --coordinator"),
    ([], 2, "give a run directory or --db URL"),
    (["--poll", "0", "--db", "sqlite:///x.db"], 2, "--poll"),
])
def test_mistakes_are_one_line(args: list[str], code: int, message: str,
                               started: list[object]) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output and not started


def test_node_mistakes(run_dir: Path, tmp_path: Path, fixture_ledger: FixtureRun,
                       started: list[object]) -> None:
    cases = [
        (["--node", "99", str(run_dir)], 7, "no node 99"),
        (["--db", fixture_ledger.url, str(run_dir)], 2, "not both"),
        (["--home", str(tmp_path / "empty")], 2, "no enrollment"),
        (["--home", str(home_with(tmp_path, 2))], 2, "give a run directory or --db URL"),
        (["--home", str(tmp_path / "home"), "--node", "3", str(run_dir)], 2, "is not the node"),
    ]
    for args, code, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == code and message in result.stderr, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not started
    assert not (tmp_path / "empty").exists()  # reading a home never creates one

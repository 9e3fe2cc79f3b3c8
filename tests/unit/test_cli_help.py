"""``--help`` of every command describes its positional arguments too (protocol.cli_app)."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from node.cli import app as node_app
from tui.cli import app as tui_app


def commands(command: click.Command) -> list[click.Command]:
    subs = getattr(command, "commands", {})
    return [command, *(c for sub in subs.values() for c in commands(sub))]


@pytest.mark.parametrize("app", [coordinator_app, node_app, tui_app],
                         ids=["atom-coordinator", "atom-node", "atom-tui"])
def test_every_positional_argument_has_help(app: typer.Typer) -> None:
    arguments = [(c.name, p.name, getattr(p, "help", None))
                 for c in commands(typer.main.get_command(app))
                 for p in c.params if isinstance(p, click.Argument)]
    assert arguments and all(help for _, _, help in arguments), arguments


@pytest.mark.parametrize("app, args, text", [
    (tui_app, ["--help"], "run directory: its ledger"),
    (node_app, ["join", "--help"], "coordinator address HOST:PORT"),
])
def test_help_shows_it(app: typer.Typer, args: list[str], text: str) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0 and text in result.stdout, result.stdout

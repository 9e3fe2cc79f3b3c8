"""The TUI live over a coordinator's status service (real gRPC, TLS, 127.0.0.1): the same
screens as over the ledger, a contributor view that shows no one else, and ``atom-tui
--coordinator`` with its one-line errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocol.processes import free_port
from protocol.signing import generate_key, save_private_key
from tests.fixture_ledger import NOW, RUN_ID
from tests.status_world import CONTRIBUTOR, StatusWorld, serving, status_world
from tui import CoordinatorSource, LedgerSource, make_app
from tui import app as tui_app_module
from tui.app import AtomApp, ContributorApp, NetworkApp
from tui.cli import app as cli
from tui.source import Source
from tui.widgets import NodeTable

from .conftest import settle
from .test_tui_live import contributor_screens, forbidden_words, screen_text

__all__ = ["status_world"]

pytestmark = pytest.mark.anyio
runner = CliRunner()


def table_rows(app: AtomApp) -> list[list[str]]:
    table = app.screen.query_one(NodeTable)
    return [[c.plain for c in table.get_row_at(i)] for i in range(table.row_count)]


async def tour(source: Source) -> tuple[list[list[str]], list[str]]:
    """The network table's rows, and every screen's text on the way through the app."""
    app = make_app(source, clock=lambda: NOW, poll_s=None)
    shots = []
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        rows = table_rows(app)
        shots.append(screen_text(app))
        for keys in (("down", "enter"), ("c",), ("escape", "p"), ("e",)):
            await pilot.press(*keys)
            await settle(pilot)
            shots.append(screen_text(app))
    source.close()
    return rows, shots


async def test_the_same_screens_as_over_the_ledger(status_world: StatusWorld) -> None:
    local_rows, local = await tour(LedgerSource.open(status_world.url, RUN_ID))
    live_rows, live = await tour(status_world.source())
    assert len(live_rows) == 4 and live_rows[1][:3] == ["borealis", "Beta Institute of Technology",
                                                        "idle"]
    assert live_rows == local_rows
    assert "borealis" in live[1] and "norm_bound" in live[1]  # node 2's detail, then the rest
    assert live == local


async def test_the_contributor_view_over_grpc_shows_no_one_else(
        status_world: StatusWorld) -> None:
    forbidden = forbidden_words(status_world.url, CONTRIBUTOR)
    app = make_app(status_world.source(node_id=CONTRIBUTOR), node_id=CONTRIBUTOR,
                   clock=lambda: NOW, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        shots = await contributor_screens(app, pilot)
        assert app.snapshot is not None and app.snapshot.network is None
        assert app.snapshot.events is None and list(app._notifications) == []
    app.source.close()
    assert "borealis" in shots[0] and "fixture-run" in shots[0]
    for shot in shots:
        for word in forbidden:
            assert word not in shot, word


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[AtomApp]:
    apps: list[AtomApp] = []
    monkeypatch.setattr(tui_app_module.AtomApp, "run", lambda self, *a, **k: apps.append(self))
    return apps


@pytest.fixture
def live(status_world: StatusWorld) -> Iterator[str]:
    """The world's run and ledger served at the real clock (the CLI signs with it)."""
    with serving(status_world.rd, status_world.url, time.time) as address:
        yield address


def test_the_three_ways_to_open_it_live(status_world: StatusWorld, live: str,
                                        started: list[AtomApp]) -> None:
    rd = status_world.rd
    for args in ([str(rd.path)], ["--key", str(rd.key_path), "--ca", str(rd.tls.ca_cert)],
                 ["--home", str(status_world.node_home)], ["--node", "3", str(rd.path)]):
        result = runner.invoke(cli, ["--coordinator", live, *args])
        assert result.exit_code == 0, (args, result.output)
    assert [type(a) for a in started] == [NetworkApp, NetworkApp, ContributorApp,
                                          ContributorApp]
    assert all(isinstance(a.source, CoordinatorSource) for a in started)
    assert [a.source.node_id for a in started] == [None, None, CONTRIBUTOR, None]
    assert [getattr(a, "node_id", None) for a in started] == [None, None, CONTRIBUTOR, 3]


def test_live_mistakes_are_one_line(status_world: StatusWorld, live: str, tmp_path: Path,
                                    started: list[AtomApp]) -> None:
    rd, home = status_world.rd, status_world.node_home
    ca = str(rd.tls.ca_cert)
    save_private_key(generate_key(), tmp_path / "mallory.key")
    (tmp_path / "garbage.key").write_text("not a key")
    cases = [
        ([f"127.0.0.1:{free_port()}", str(rd.path)], 8, "cannot reach the coordinator"),
        ([live, "--key", str(tmp_path / "mallory.key"), "--ca", ca], 5,
         "refused the status request: bad_signature: request is not signed by the "
         "coordinator's key"),
        ([live, "--key", str(tmp_path / "garbage.key"), "--ca", ca], 2,
         "is not an unencrypted PEM key"),
        ([live, "--key", str(rd.key_path), "--ca", str(tmp_path / "none.pem")], 2,
         "cannot read CA certificate"),
        ([live, "--key", str(rd.key_path)], 2, "needs the coordinator key and the run's CA"),
        ([live, "--home", str(home), "--key", str(rd.key_path)], 2, "--home brings"),
        ([live, "--home", str(home), "--node", "3"], 2, "is not the node enrolled"),
        ([live, "--node", "99", str(rd.path)], 7, "no node 99"),
        ([live, str(tmp_path)], 2, "is not a run directory"),
    ]
    for args, code, message in cases:
        result = runner.invoke(cli, ["--coordinator", *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == code and len(lines) == 1, (args, result.output)
        assert lines[0].startswith("error: ") and message in lines[0], lines
    assert not started

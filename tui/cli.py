"""``atom-tui``: watch a run from its ledger or a running coordinator, or one node only.

::

    atom-tui RUN_DIR                  the network view of a run directory's ledger
    atom-tui --db URL                 the same for a ledger URL (e.g. PostgreSQL)
    atom-tui --node N RUN_DIR         node N's contributor view (its detail and credits only)
    atom-tui --home ~/.atom-node --db URL
                                      the contributor view of the node enrolled in that home
                                      (a node's home does not hold the ledger: give --db or DIR)
    atom-tui --coordinator ADDR RUN_DIR
    atom-tui --coordinator ADDR --key coordinator.key --ca ca.pem
                                      live from a coordinator's status service, signed with the
                                      run's coordinator key, TLS checked with the run's CA
    atom-tui --coordinator ADDR --home ~/.atom-node
                                      live contributor view, signed with the node's own key

The ledger is opened read-only and the status service only reads; the TUI never writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from protocol.cli_app import CliApp
from protocol.cli_errors import one_line_errors
from protocol.errors import ConfigError

if TYPE_CHECKING:
    from .coordinator_source import CoordinatorSource
    from .snapshot import Source

__all__ = ["app", "main", "resolve_source"]

app = CliApp(add_completion=False, help=__doc__.split("::")[0].strip())


def _node_from_home(home: Path) -> int:
    from node.identity import NodeHome  # reads node.json only: never makes a key

    enrollment = NodeHome(home.expanduser().resolve()).enrollment()
    if enrollment is None:
        raise ConfigError(f"no enrollment in {home}: this node has not joined a coordinator")
    return enrollment.node_id


def _live_source(address: str, run_dir: Path | None, db: str | None, key: Path | None,
                 ca: Path | None, home: Path | None, node: int | None) -> CoordinatorSource:
    """The coordinator's status service, with the team's files or a node's home (whose
    enrolled node is ``node``)."""
    from .coordinator_source import CoordinatorSource

    if db is not None:
        raise ConfigError("give --coordinator ADDR or --db URL, not both")
    if home is not None:
        if run_dir is not None or key is not None or ca is not None:
            raise ConfigError("--home brings the node's key and CA: not with a run directory, "
                              "--key or --ca")
        from node.identity import NodeHome

        node_home = NodeHome(home.expanduser().resolve())
        return CoordinatorSource.from_files(address, node_home.key_path, node_home.ca_path,
                                            node)
    if run_dir is not None:
        from coordinator.rundir import RunDir

        rd = RunDir(run_dir.expanduser().resolve())
        rd.config()  # "is not a run directory" rather than a missing key
        key, ca = key or rd.key_path, ca or rd.tls.ca_cert
    if key is None or ca is None:
        raise ConfigError("--coordinator needs the coordinator key and the run's CA: give the "
                          "run directory, --key and --ca, or a node's --home")
    return CoordinatorSource.from_files(address, key, ca)


def resolve_source(run_dir: Path | None, db: str | None) -> tuple[str, str | None]:
    """The ledger URL and run id to read, from a run directory or a URL."""
    if run_dir is not None and db is not None:
        raise ConfigError("give a run directory or --db URL, not both")
    if db is not None:
        return db, None
    if run_dir is None:
        raise ConfigError("give a run directory or --db URL (a node's home holds no ledger)")
    from coordinator.rundir import RunDir

    cfg = RunDir(run_dir.expanduser().resolve()).config()
    return cfg.ledger_url(run_dir.expanduser().resolve()), cfg.run.id


@app.command()
@one_line_errors
def tui(
    run_dir: Annotated[Optional[Path], typer.Argument(
        help="run directory: its ledger (run.toml names it), or with --coordinator its "
             "coordinator.key and tls/ca.pem", show_default=False)] = None,
    db: Annotated[Optional[str], typer.Option(
        "--db", help="ledger URL instead of a run directory")] = None,
    node: Annotated[Optional[int], typer.Option(
        "--node", help="contributor view of this node id only")] = None,
    home: Annotated[Optional[Path], typer.Option(
        "--home", help="contributor view of the node enrolled in this node home")] = None,
    coordinator: Annotated[Optional[str], typer.Option(
        "--coordinator", metavar="ADDR",
        help="live from a running coordinator's status service at HOST:PORT")] = None,
    key: Annotated[Optional[Path], typer.Option(
        "--key", help="with --coordinator: the run's coordinator.key (the team's view)")] = None,
    ca: Annotated[Optional[Path], typer.Option(
        "--ca", help="with --coordinator: the run's tls/ca.pem")] = None,
    poll: Annotated[float, typer.Option(
        help="seconds between checks of a ledger (a coordinator pushes its changes; it is "
        "polled this often only if it cannot)")] = 1.0,
) -> None:
    """Watch an ATOM Network run: nodes, progress, events, contributions and credits."""
    if poll <= 0:
        raise ConfigError("--poll must be > 0 seconds")
    if home is not None:
        from_home = _node_from_home(home)
        if node is not None and node != from_home:
            raise ConfigError(f"--node {node} is not the node enrolled in {home} ({from_home})")
        node = from_home
    source: Source
    live: CoordinatorSource | None = None
    if coordinator is not None:
        source = live = _live_source(coordinator, run_dir, db, key, ca, home, node)
    elif key is not None or ca is not None:
        raise ConfigError("--key and --ca go with --coordinator ADDR")
    else:
        from .source import LedgerSource

        url, run_id = resolve_source(run_dir, db)
        source = LedgerSource.open(url, run_id)

    from .app import make_app

    try:
        if node is not None:
            source.check_node(node)
        elif live is not None:
            live.check()
        make_app(source, node_id=node, poll_s=poll).run()
    finally:
        source.close()


def main() -> None:
    app()

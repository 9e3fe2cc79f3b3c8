"""``atom-tui``: watch a run from its ledger, or a contributor's own node.

::

    atom-tui RUN_DIR                  the network view of a run directory's ledger
    atom-tui --db URL                 the same for a ledger URL (e.g. PostgreSQL)
    atom-tui --node N RUN_DIR         node N's contributor view (its detail and credits only)
    atom-tui --home ~/.atom-node --db URL
                                      the contributor view of the node enrolled in that home
                                      (a node's home does not hold the ledger: give --db or DIR)

The ledger is opened read-only; the TUI never writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from protocol.cli_errors import one_line_errors
from protocol.errors import ConfigError

__all__ = ["app", "main", "resolve_source"]

app = typer.Typer(add_completion=False, help=__doc__.split("::")[0].strip())


def _node_from_home(home: Path) -> int:
    from node.identity import NodeHome  # reads node.json only: never makes a key

    enrollment = NodeHome(home.expanduser().resolve()).enrollment()
    if enrollment is None:
        raise ConfigError(f"no enrollment in {home}: this node has not joined a coordinator")
    return enrollment.node_id


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
        help="run directory (its run.toml names the ledger)", show_default=False)] = None,
    db: Annotated[Optional[str], typer.Option(
        "--db", help="ledger URL instead of a run directory")] = None,
    node: Annotated[Optional[int], typer.Option(
        "--node", help="contributor view of this node id only")] = None,
    home: Annotated[Optional[Path], typer.Option(
        "--home", help="contributor view of the node enrolled in this node home")] = None,
    coordinator: Annotated[Optional[str], typer.Option(
        "--coordinator", help="live updates from a coordinator's status service")] = None,
    poll: Annotated[float, typer.Option(help="seconds between ledger reads")] = 1.0,
) -> None:
    """Watch an ATOM Network run: nodes, progress, events, contributions and credits."""
    if coordinator is not None:
        raise ConfigError("live gRPC mode needs a coordinator with the status service; "
                          "open the run's ledger instead (a run directory or --db URL)")
    if poll <= 0:
        raise ConfigError("--poll must be > 0 seconds")
    if home is not None:
        from_home = _node_from_home(home)
        if node is not None and node != from_home:
            raise ConfigError(f"--node {node} is not the node enrolled in {home} ({from_home})")
        node = from_home
    url, run_id = resolve_source(run_dir, db)

    from .app import make_app
    from .source import LedgerSource

    source = LedgerSource.open(url, run_id)
    try:
        if node is not None:
            source.check_node(node)
        make_app(source, node_id=node, poll_s=poll).run()
    finally:
        source.close()


def main() -> None:
    app()

"""``atom-coordinator demo``: a whole network on loopback — coordinator + N local nodes.

Everything is real: init (keys, CA), invites, nodes enrolling over gRPC with TLS and joining
the SuperLink as separate processes with SuperNode auth, signed updates, the ledger.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from protocol.errors import AtomError, NetworkError
from protocol.processes import flower_env, free_port, spawn, stop

from coordinator.accounting.report import run_summary
from coordinator.ledger import Ledger
from coordinator.rundir import RunDir, create_invite, init_run
from coordinator.services.launcher import Coordinator

__all__ = ["run_demo"]

_ENROLL_TIMEOUT_S = 90.0
DEMO_THREADS = 1  # N nodes + the coordinator share the machine: one torch thread each


def node_command(rd: RunDir, token: str, name: str, home: Path, threads: int,
              extra: list[str]) -> list[str]:
    addr = rd.coordinator_address(rd.config())
    return [sys.executable, "-m", "node", "join", addr, "--token", token, "--name", name,
            "--home", str(home), "--threads", str(threads), "--device", "cpu",
            "--metrics", f"127.0.0.1:{free_port()}", *extra]


def _wait_enrolled(rd: RunDir, c: Coordinator, procs: list[subprocess.Popen[bytes]],
                   n: int, logs: list[Path], show: Callable[[int], None]) -> None:
    end = time.monotonic() + _ENROLL_TIMEOUT_S
    while (enrolled := len(c.ledger.nodes())) < n:
        show(enrolled)
        for i, (p, log) in enumerate(zip(procs, logs)):
            if p.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
                raise NetworkError(f"demo node {i} exited early (code {p.returncode}): "
                                   f"{tail[0]} — see {log}")
        if time.monotonic() > end:
            raise NetworkError(f"demo nodes did not enroll within {_ENROLL_TIMEOUT_S:.0f} s "
                               f"(see {rd.logs})")
        time.sleep(0.3)


def run_demo(*, nodes: int = 3, rounds: int = 3, workdir: Path | None = None,
             console: Console, overrides: dict[str, Any] | None = None,
             node_args: dict[int, list[str]] | None = None,
             on_tick: Callable[[list[subprocess.Popen[bytes]], Ledger], None] | None = None,
             ) -> tuple[dict[str, Any], str]:
    """Run the demo; return (summary, Flower run status).

    ``node_args`` adds CLI flags to node i (tests use it for a node with a wrong key);
    ``on_tick(procs, ledger)`` is called while the run is under way (tests kill a node there).
    """
    t0 = time.monotonic()
    wd = (workdir or Path(tempfile.mkdtemp(prefix="atom-demo-"))).resolve()
    settings = dict(run_rounds=rounds, run_min_nodes=nodes, run_wait_for_nodes_s=60.0,
                    network_fleet_port=free_port(), network_coordinator_port=free_port(),
                    network_metrics_address=f"127.0.0.1:{free_port()}",
                    **(overrides or {}))
    rd = init_run(wd, force=True, **settings)
    with rd.ledger() as ledger:
        if ledger.nodes() or ledger.versions():  # a demo would mix its run into another's
            raise AtomError(f"ledger {ledger.url} already holds a run: give the demo an "
                            "empty database (or PostgreSQL schema)")
    console.print(f"[bold]ATOM demo[/] · {nodes} nodes · {rounds} rounds · workdir {wd}")
    procs: list[subprocess.Popen[bytes]] = []
    status = "not started"
    progress = _progress(console)
    with Coordinator(rd) as coord, progress:
        joined = progress.add_task("nodes enrolled", total=nodes, status="starting nodes")
        try:
            logs = []
            for i in range(nodes):
                inst = f"University {chr(ord('A') + i)}"
                token = create_invite(rd, inst)
                log = rd.logs / f"node-{i}.log"
                cmd = node_command(rd, token, f"node-{chr(ord('a') + i)}", wd / "nodes" / str(i),
                                DEMO_THREADS, (node_args or {}).get(i, []))
                procs.append(spawn(cmd, env=flower_env(wd / "nodes" / f"flwr-{i}"), log=log))
                logs.append(log)
            _wait_enrolled(rd, coord, procs, nodes, logs,
                           lambda k: progress.update(joined, completed=k))
            progress.update(joined, completed=nodes, status="TLS + node keys")
            run_id = coord.start_run()
            status = _watch(coord, run_id, rounds, progress, procs, on_tick)
        finally:
            for p in procs:
                stop(p)
        summary = run_summary(coord.ledger, coord.cfg.ledger_url(rd.path))
        if (failure := coord.failure(status)) is not None:
            summary["error"] = failure
    summary["run_status"] = status
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary, status


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), console=console)


def _watch(coord: Coordinator, run_id: int, rounds: int, progress: Progress,
           procs: list[subprocess.Popen[bytes]],
           on_tick: Callable[[list[subprocess.Popen[bytes]], Ledger], None] | None) -> str:
    task = progress.add_task("model versions", total=rounds, status="waiting for nodes")
    # Without a terminal (CI logs, pipes) a live bar shows nothing: print each event instead.
    plain = not progress.console.is_terminal
    seen_event = 0

    def tick() -> None:
        nonlocal seen_event
        versions = coord.ledger.versions()
        done = sum(1 for v in versions[1:] if v.val_loss is not None)
        events = coord.ledger.events(since_id=seen_event)
        for e in events if plain else ():
            progress.console.print(f"[dim]{time.strftime('%H:%M:%S', time.localtime(e.at))}[/] "
                                   f"{e.kind:8} {e.message}", highlight=False)
        if events:
            seen_event = events[-1].id
            progress.update(task, status=events[-1].message[:60])
        if versions and versions[-1].val_loss is not None:
            progress.update(task, status=f"v{versions[-1].version} val loss "
                                         f"{versions[-1].val_loss:.3f}")
        progress.update(task, completed=done)
        if on_tick is not None:
            on_tick(procs, coord.ledger)

    return coord.wait(run_id, tick=tick)


def demo_ok(summary: dict[str, Any]) -> None:
    """Raise if the demo did not do what it promises (a run that did not learn failed)."""
    losses = summary["val_loss"]
    if summary.get("error"):
        raise AtomError(summary["error"])
    if len(losses) < 2 or losses[0] is None or losses[-1] is None or not losses[-1] < losses[0]:
        raise AtomError(f"validation loss did not drop: {losses}")

"""The join supervisor: keep this node's SuperNode and warm worker running, and show progress.

Two processes per node: the Flower SuperNode (control plane, ``--isolation process``) and the
warm worker on its Runtime API (``node.warm_worker``), which runs every lease in one process.
A SuperNode exits when the SuperLink restarts or the network drops: both are restarted with
exponential backoff. A worker that dies alone is restarted alone (the SuperNode keeps its
place in the network; only the lease in flight is lost). Ctrl-C stops both cleanly. The
terminal shows one live line: what the node is doing (from ``progress.json``) and how fast.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from protocol.errors import AtomError, EnrollmentError
from protocol.metrics import MetricsServer, multiprocess_env, serve_metrics
from protocol.processes import flower_env, free_port, spawn, stop

from .identity import Enrollment, NodeHome
from .progress import read_progress

__all__ = ["Supervisor", "new_runtime_secret", "supernode_command", "worker_command"]

_BACKOFF_MAX_S = 60.0
_HEALTHY_AFTER_S = 30.0  # a run this long resets the backoff
_REFUSALS_TO_GIVE_UP = 3  # a revoked key would otherwise be retried forever
# What Flower logs when the SuperLink does not know (any more) the key a SuperNode presents.
_KEY_REFUSED = ("Failed to activate SuperNode", "Exit Code: 302")


def _key_refused(log: Path, since: int) -> bool:
    """Whether the SuperNode run that logged from byte ``since`` on was refused its key."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return False
    return any(marker in text for marker in _KEY_REFUSED)


def supernode_command(home: NodeHome, e: Enrollment, *, port: int, threads: int, device: str,
                      sign_key: Path | None, secret_file: Path,
                      slowdown: float = 1.0) -> list[str]:
    node_config = f'home="{home.path}" threads={threads} device="{device}"'
    if slowdown != 1.0:
        node_config += f" slowdown={float(slowdown)}"
    if sign_key is not None:
        node_config += f' sign-key="{sign_key}"'
    return ["flower-supernode", "--superlink", e.fleet_address,
            "--root-certificates", str(home.ca_path),
            "--auth-supernode-private-key", str(home.key_path),
            "--port", str(port), "--node-config", node_config,
            # no flwr-clientapp per message: the warm worker takes the tasks, and only it
            "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]


def worker_command(port: int, secret_file: Path) -> list[str]:
    """The warm worker on the Runtime API of the SuperNode started with ``port``."""
    return [sys.executable, "-m", "node.warm_worker", "--runtime-api", f"127.0.0.1:{port}",
            "--secret-file", str(secret_file)]


def new_runtime_secret(home: NodeHome) -> Path:
    """A fresh secret for the SuperNode and its worker (mode 0600), written per start."""
    path = home.path / "runtime.secret"
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    path.with_suffix(".tmp").replace(path)
    return path


def _status_line(e: Enrollment, home: NodeHome, restarts: int) -> Text:
    p = read_progress(home.progress_path)
    head = Text(f"node {e.node_id} {e.name} ({e.institution}) ", style="bold")
    if p is None or (p.done and time.time() - p.updated > 2):
        head.append("idle · waiting for work", style="dim")
    elif p.kind == "train":
        head.append(f"training shard {p.shard_id} (round {p.round}) "
                    f"step {p.step}/{p.steps} · {p.tokens_per_s:,.0f} tok/s", style="green")
    elif p.kind == "fetch":
        head.append(f"fetching {p.note} · {p.tokens_per_s / 1e6:,.1f} MB/s", style="magenta")
    else:
        head.append(f"evaluating version slice {p.shard_id} (round {p.round})", style="cyan")
    if restarts:
        head.append(f" · restarts {restarts}", style="yellow")
    return head


@dataclass
class Supervisor:
    home: NodeHome
    enrollment: Enrollment
    threads: int = 1
    device: str = "auto"
    sign_key: Path | None = None
    slowdown: float = 1.0  # benchmarks: play a device this many times slower
    metrics_address: str = ""  # HOST:PORT of the node's /metrics ("" = none)
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _stop: threading.Event = field(default_factory=threading.Event)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)  # `kill` stops like Ctrl-C
        logs = self.home.path / "logs"
        logs.mkdir(exist_ok=True)
        env = flower_env(self.home.path / "flwr-home")
        metrics = self._serve_metrics(env)
        try:
            return self._supervise(env, logs)
        finally:
            if metrics is not None:
                metrics.close()

    def _serve_metrics(self, env: dict[str, str]) -> MetricsServer | None:
        """Serve the warm worker's metrics (it writes them to files, ``protocol.metrics``);
        a node whose metrics port is taken works on without them."""
        if not self.metrics_address:
            return None
        folder = self.home.path / "metrics"
        env.update(multiprocess_env(folder))
        try:
            return serve_metrics(self.metrics_address, folder)
        except AtomError as err:
            self.console.print(f"warning: no metrics: {err}", style="yellow")
            return None

    def _supervise(self, env: dict[str, str], logs: Path) -> int:
        restarts, refused, backoff = 0, 0, 1.0
        log, worker_log = logs / "supernode.log", logs / "worker.log"
        live = Live(console=self.console, refresh_per_second=2, transient=True,
                    auto_refresh=self.console.is_terminal)
        with live:
            while not self._stop.is_set():
                port, secret = free_port(), new_runtime_secret(self.home)
                cmd = supernode_command(self.home, self.enrollment, port=port,
                                        threads=self.threads, device=self.device,
                                        sign_key=self.sign_key, secret_file=secret,
                                        slowdown=self.slowdown)
                started = time.monotonic()
                log_start = log.stat().st_size if log.exists() else 0
                proc = spawn(cmd, env=env, log=log)
                worker = _Worker(worker_command(port, secret), env, worker_log, self.console)
                try:
                    while proc.poll() is None and not self._stop.wait(0.5):
                        worker.keep_alive()
                        live.update(_status_line(self.enrollment, self.home,
                                                 restarts + worker.restarts))
                        if not self.console.is_terminal:
                            live.refresh()
                except KeyboardInterrupt:
                    self._stop.set()
                finally:
                    worker.stop()
                    if proc.poll() is None:
                        stop(proc)
                if self._stop.is_set():
                    break
                if time.monotonic() - started > _HEALTHY_AFTER_S:
                    backoff = 1.0
                restarts += 1
                refused = refused + 1 if _key_refused(log, log_start) else 0
                if refused >= _REFUSALS_TO_GIVE_UP:
                    raise EnrollmentError(
                        "the coordinator refuses this node's key (revoked, or the run was "
                        f"re-initialised); see {log}")
                self.console.print(f"SuperNode exited (code {proc.returncode}); restarting in "
                                   f"{backoff:.0f} s — see {logs / 'supernode.log'}",
                                   style="yellow")
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        self.console.print("node stopped", style="dim")
        return 0


class _Worker:
    """The warm worker process: started at once, restarted (with backoff) when it dies."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path,
                 console: Console) -> None:
        self.cmd, self.env, self.log, self.console = cmd, env, log, console
        self.restarts, self._backoff, self._due = 0, 1.0, 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        self.proc, self._started = spawn(self.cmd, env=self.env, log=self.log), time.monotonic()

    def keep_alive(self) -> None:
        now = time.monotonic()
        if self.proc is not None and self.proc.poll() is not None:  # it died
            code, self.proc = self.proc.returncode, None
            if now - self._started > _HEALTHY_AFTER_S:
                self._backoff = 1.0
            self._due = now + self._backoff
            self.console.print(f"worker exited (code {code}); restarting in "
                               f"{self._backoff:.0f} s — see {self.log}", style="yellow")
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
        if self.proc is None and now >= self._due:
            self.restarts += 1
            self._start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)

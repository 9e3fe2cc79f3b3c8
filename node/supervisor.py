"""The join supervisor: keep this node's SuperNode and warm worker running, and show progress.

Two processes per node: the Flower SuperNode (control plane, ``--isolation process``) and the
warm worker on its Runtime API (``node.warm_worker``), which runs every lease in one process.
A SuperNode exits when the SuperLink restarts or the network drops: both are restarted with
exponential backoff. A worker that dies alone is restarted alone (the SuperNode keeps its
place in the network; only the lease in flight is lost). Ctrl-C stops both at once. The
terminal shows one live line: what the node is doing (from ``progress.json``) and how fast.

SIGTERM and SIGUSR1 (a batch job's time is up, ``systemctl stop``) make the node *leave*:
the worker gets SIGUSR1 and hands back the lease in flight after its current training step
(and any message still reaching the SuperNode, at once); the SuperNode is stopped only once
its log shows every message it received answered and sent, and a moment passed with no new
one (``_leave``, at most ``leave_s``); then ``run`` returns 0.
"""

from __future__ import annotations

import os
import secrets
import signal
import shutil
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
from protocol.processes import flower_env, free_port, spawn, stop, tool_path

from .identity import Enrollment, NodeHome
from .progress import read_progress
from .supernode import JUST_JOINED

__all__ = ["COMPILE_MODES", "Supervisor", "new_runtime_secret", "supernode_command",
           "worker_command"]

# ``join --compile``: the worker's ``training.model_cache.compile_choice`` reads them
COMPILE_MODES = ("auto", "on", "off")

_BACKOFF_MAX_S = 60.0
_HEALTHY_AFTER_S = 30.0  # a run this long resets the backoff
_REFUSALS_TO_GIVE_UP = 3  # a revoked key would otherwise be retried forever
# SLURM sends SIGKILL 30 s after SIGTERM (KillWait): leaving must fit well inside
_LEAVE_S = 25.0
# a SuperNode with nothing to do asks for work every 3 s: this long without a new message,
# none is on its way
_QUIET_S = 4.0
# What Flower 1.42's SuperNode logs as a message comes in, and as the message's handling ends
# (its reply sent, or the message dropped); tests/unit/test_node_leave.py checks the source.
_RECEIVING = "Receiving: "
_SETTLED = ("Sent successfully", "Failed to send message", "Failed to receive message",
            "Ignoring message", "Ignoring reply message", "Failed to create task")
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


def messages_in_flight(log: Path, since: int) -> tuple[int, int]:
    """``(received, unsettled)``: messages the SuperNode that logged from byte ``since`` on
    began to receive, and of those the ones whose reply has not gone out yet."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return 0, 0
    received = text.count(_RECEIVING)
    settled = sum(text.count(marker) for marker in _SETTLED)
    return received, max(0, received - settled)


SUPERNODE = "atom-supernode"  # a console script of this package (node/supernode.py)


def check_installed() -> None:
    """One clear line, before anything is enrolled or started, if this checkout's
    ``atom-supernode`` is missing: a checkout updated without ``pip install -e .`` again
    lacks the console scripts added since, and its SuperNode would fail at every restart
    with the reason only in ``supernode.log``."""
    if shutil.which(SUPERNODE, path=tool_path()) is None:  # as the SuperNode is started
        raise AtomError(f"{SUPERNODE} is not installed next to {sys.executable}: run "
                        "`pip install -e .` in the ATOM checkout again, then join")


def supernode_command(home: NodeHome, e: Enrollment, *, port: int, threads: int, device: str,
                      sign_key: Path | None, secret_file: Path,
                      slowdown: float = 1.0, policy: Path | None = None,
                      gpus: int = 1, checkpointing: bool = False,
                      compile_mode: str = "auto") -> list[str]:
    node_config = f'home="{home.path}" threads={threads} device="{device}"'
    if compile_mode != "auto":
        node_config += f' compile="{compile_mode}"'
    if gpus > 1:
        node_config += f" gpus={int(gpus)}"
    if checkpointing:
        node_config += " checkpointing=true"
    if slowdown != 1.0:
        node_config += f" slowdown={float(slowdown)}"
    if policy is not None:
        node_config += f' policy="{policy}"'
    if sign_key is not None:
        node_config += f' sign-key="{sign_key}"'
    # Flower's SuperNode, taking its next message while the worker runs one (node/supernode.py)
    return [SUPERNODE, "--superlink", e.fleet_address,
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
    elif p.kind == "tasks":
        head.append(f"running lm-eval tasks (round {p.round})", style="cyan")
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
    gpus: int = 1  # > 1: each lease data-parallel over cuda:0..gpus-1
    checkpointing: bool = False  # activation checkpointing in every train lease
    compile_mode: str = "auto"  # one of COMPILE_MODES: torch.compile of the worker's model
    sign_key: Path | None = None
    slowdown: float = 1.0  # benchmarks: play a device this many times slower
    metrics_address: str = ""  # HOST:PORT of the node's /metrics ("" = none)
    console: Console = field(default_factory=lambda: Console(stderr=True))
    policy: Path | None = None  # the contribution policy for the worker (JSON, ``node.policy``)
    leave_s: float = _LEAVE_S
    quiet_s: float = _QUIET_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _leaving: threading.Event = field(default_factory=threading.Event)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def request_leave(self, *_: object) -> None:
        """Hand the lease in flight back, then stop (SIGTERM, SIGUSR1)."""
        self._leaving.set()
        self._stop.set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_leave)
            signal.signal(signal.SIGUSR1, self.request_leave)
        logs = self.home.path / "logs"
        logs.mkdir(exist_ok=True)
        env = flower_env(self.home.path / "flwr-home")
        # torch.compile's caches in the node's home rather than /tmp: a worker restarted, or
        # a node rebooted, finds the kernels it compiled (bench/first_lease.py, restarted)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.home.compile_cache_path))
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
                                        slowdown=self.slowdown, policy=self.policy,
                                        gpus=self.gpus, checkpointing=self.checkpointing,
                                        compile_mode=self.compile_mode)
                started = time.monotonic()
                log_start = log.stat().st_size if log.exists() else 0
                # the first SuperNode of a join asks for its first lease at once; a restart
                # (the SuperLink restarted: every node's at once) waits as Flower does
                proc = spawn(cmd, env={**env, JUST_JOINED: "1"} if restarts == 0 else env,
                             log=log)
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
                    if self._leaving.is_set() and proc.poll() is None:
                        self._leave(proc, worker, log, log_start)
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

    def _leave(self, proc: subprocess.Popen[bytes], worker: _Worker, log: Path,
               since: int) -> None:
        """Have the worker hand back what it holds and the SuperNode send it (its log from
        byte ``since`` on is this run's), then return: the caller stops both. Returns at
        once when the SuperNode is gone, or the worker is and nothing waits to be sent (a
        whole process group signalled, as a demo's teardown does)."""
        if not worker.signal(signal.SIGUSR1):
            return  # no worker: nothing can be answered
        self.console.print("leaving: handing back the lease in flight", style="yellow")
        start = time.monotonic()
        seen, quiet_from = -1, start
        while (now := time.monotonic()) - start < self.leave_s and proc.poll() is None:
            received, unsettled = messages_in_flight(log, since)
            if received != seen:
                seen, quiet_from = received, now
            if not unsettled and (not worker.running or now - quiet_from >= self.quiet_s):
                return
            time.sleep(0.2)
        if proc.poll() is not None:
            return
        self.console.print(f"leaving: a reply was still on its way after {self.leave_s:.0f} s;"
                           " the coordinator reissues that lease at its deadline",
                           style="yellow")


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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the worker; False when none is running."""
        if not self.running:
            return False
        self.proc.send_signal(sig)  # type: ignore[union-attr]
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)

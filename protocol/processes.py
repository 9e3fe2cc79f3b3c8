"""Starting and reaping the long-running processes both sides spawn (Flower daemons, nodes).

Every child starts in its own session so that one signal reaches its whole process group
(flower-superlink starts flower-superexec, which starts flwr-serverapp; a SuperNode starts a
flwr-clientapp per message). Nothing here may import torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["alive", "flower_env", "free_port", "process_token", "spawn", "stop", "tool_path",
           "wait_port", "watch_owner"]


def tool_path() -> str:
    """PATH with this interpreter's scripts first: Flower starts its helpers
    (flower-superexec, flwr-clientapp) by name, and so do we (atom-supernode), and they must
    resolve to this environment even when it is not activated."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: a private FLWR_HOME and no calls to the outside."""
    env = dict(os.environ)
    env["PATH"] = tool_path()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # The SuperExec polls for new work; the default leaves ~3 s idle per message.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# Run in a bare interpreter (-S -E: no site, no env hooks) that asks Linux to SIGTERM it when
# its parent dies, then becomes the real command. Doing this with ``preexec_fn`` would force a
# plain fork() of a process that may run gRPC threads, which gRPC does not survive reliably.
_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() == int(sys.argv[1]):  # the parent may already be gone\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def spawn(cmd: Sequence[str], *, env: Mapping[str, str], log: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session, output to ``log``; on Linux it dies with us."""
    argv = list(cmd)
    if sys.platform == "linux":
        argv = [sys.executable, "-S", "-E", "-c", _TRAMPOLINE, str(os.getpid()), *argv]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first found first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # the command name may hold spaces: the parent pid follows the last ')'
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the child's process group and every descendant (Flower starts some helpers in
    sessions of their own), then SIGKILL what is left, and reap the child."""
    if proc is None:
        return
    tree = _descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _kill(tree, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Helpers that outlived the leader: its group, and the tree it had when we started.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _kill([p for p in tree + _descendants(proc.pid) if os.path.exists(f"/proc/{p}")],
          signal.SIGKILL)


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
              ) -> bool:
    """Wait until something accepts TCP connections on host:port (or ``proc`` exits)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux); None if it is gone or a
    zombie (dead, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def process_token(pid: int | None = None) -> str:
    """Names one process for its lifetime: ``pid:start-time`` (a reused pid is another)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or ''}"


def alive(token: str) -> bool:
    """Is the process ``process_token`` named still running?"""
    pid, _, started = token.partition(":")
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    except ValueError:
        return False
    return not started or _start_time(int(pid)) == started


def watch_owner(token: str, on_gone: Callable[[], None], every_s: float = 1.0) -> threading.Thread:
    """Call ``on_gone`` once the process ``token`` names has died. For what its owner starts
    at one remove, where PR_SET_PDEATHSIG cannot reach: flower-superlink starts the SuperExec
    that starts ``flwr-serverapp``, and a coordinator killed with ``kill -9`` must leave no
    serverapp behind."""
    def watch() -> None:
        while alive(token):
            time.sleep(every_s)
        on_gone()

    thread = threading.Thread(target=watch, name="owner-watch", daemon=True)
    thread.start()
    return thread


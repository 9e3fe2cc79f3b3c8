"""How many real Flower SuperNodes one machine holds against one real SuperLink, and what
the SuperLink pays for them while they are idle.

Starts a ``flower-superlink`` on loopback (plain HTTP, no node auth: what is measured is the
control plane's load, not TLS) and ``flower-supernode`` processes in batches of ``--batch``,
each waiting until the SuperLink has activated it, until ``--max`` or until the machine's
available memory would fall below ``--reserve-gib``. At each level it measures, over
``--window`` seconds of idleness: the SuperLink's CPU (a fraction of one core: it serves
from one uvicorn worker), the SuperNodes' CPU and the median SuperNode's resident memory.
Idle SuperNodes make a fixed rate of requests (a pull every 3 s, a heartbeat every 30 s), so
CPU over that rate estimates how many requests one SuperLink core serves
(``superlink_rps_per_core``), which ``bench/scale_plan.py`` takes as ``--superlink-rps``.
Every process is stopped at the end.

    python bench/supernodes.py                   # up to 100 SuperNodes, 20 at a time
    python bench/supernodes.py --max 150 --json

Run on demand; it needs several GiB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol.processes import flower_env, free_port, spawn, stop, wait_port  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a spawned process sits under a small trampoline)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


def _node_mb(proc: Any) -> float:
    """A SuperNode's resident memory: the largest process of its tree (not the trampoline)."""
    return max(_rss_mb(q) for q in _tree(proc.pid))


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _count(log: Path, marker: str) -> int:
    try:
        return log.read_text(errors="replace").count(marker)
    except OSError:
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max", type=int, default=100, help="SuperNodes at most")
    p.add_argument("--batch", type=int, default=20, help="SuperNodes started per level")
    p.add_argument("--window", type=float, default=15.0, help="seconds measured per level")
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="stop adding SuperNodes before available memory falls below this")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    out: dict[str, Any] = {"levels": []}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = flower_env(root / "flwr-home")
        port = free_port()
        link_log = root / "superlink.log"
        link = spawn(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                      str(port), "--disable-runtime-dependency-installation"],
                     env=env, log=link_log)
        try:
            if not wait_port("127.0.0.1", port, 60, link):
                print(f"SuperLink did not start (see {link_log})", file=sys.stderr)
                return 1
            link_pids = _tree(link.pid)
            started, limited = 0, f"--max {a.max}"
            while started < a.max:
                per_node = statistics.median(_node_mb(q) for q in procs) if procs else 150.0
                room = int((_available_gib() - a.reserve_gib) * 1024 / per_node)
                n = min(a.batch, a.max - started, room)
                if n <= 0:
                    limited = f"memory: {_available_gib():.1f} GiB available, " \
                              f"{per_node:.0f} MB per SuperNode"
                    break
                t0 = time.perf_counter()
                for _ in range(n):
                    node_env = flower_env(root / f"node-{started}")
                    procs.append(spawn(["flower-supernode", "--insecure", "--superlink",
                                        f"127.0.0.1:{port}", "--port", str(free_port()),
                                        "--isolation", "process"], env=node_env,
                                       log=root / f"node-{started}.log"))
                    started += 1
                while _count(link_log, "Activated node_id") < started:
                    if time.perf_counter() - t0 > 60 + 5 * n:
                        limited = "SuperNodes stopped registering within the time allowed"
                        break
                    time.sleep(0.5)
                join_s = time.perf_counter() - t0
                time.sleep(3.0)  # past the start-up burst
                node_pids = [q for proc in procs for q in _tree(proc.pid)]
                c_link = sum(_cpu_s(q) for q in link_pids)
                c_nodes = sum(_cpu_s(q) for q in node_pids)
                t1 = time.perf_counter()
                time.sleep(a.window)
                dt = time.perf_counter() - t1
                level = {
                    "supernodes": started,
                    "registered": _count(link_log, "Activated node_id"),
                    "join_s": round(join_s, 1),
                    "superlink_cpu": round((sum(_cpu_s(q) for q in link_pids) - c_link) / dt, 3),
                    "supernodes_cpu": round((sum(_cpu_s(q) for q in node_pids) - c_nodes) / dt, 3),
                    # idle SuperNodes pull every 3 s and send a heartbeat every 30 s (Flower
                    # 1.42); the access log does not list pulls, so the rate is that one
                    "superlink_rps": round(started * (1 / 3 + 1 / 30), 1),
                    "supernode_rss_mb": round(statistics.median(_node_mb(q) for q in procs), 1),
                    "superlink_rss_mb": round(sum(_rss_mb(q) for q in link_pids), 1),
                    "available_gib": round(_available_gib(), 1),
                }
                out["levels"].append(level)
                print(json.dumps(level), file=sys.stderr)
                if level["registered"] < started:
                    break
            last = out["levels"][-1] if out["levels"] else {}
            out.update(supernodes=last.get("registered", 0), limited_by=limited)
            busy = [lv for lv in out["levels"] if lv["superlink_cpu"] > 0.01]
            out["superlink_rps_per_core"] = (
                round(statistics.median(lv["superlink_rps"] / lv["superlink_cpu"]
                                        for lv in busy), 1) if busy else None)
        finally:
            for proc in procs:
                stop(proc, timeout=5.0)
            stop(link)
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

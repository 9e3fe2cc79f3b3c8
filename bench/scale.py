"""A thousand nodes on one coordinator: the real loop, verifier and ledger under load.

The coordinator's asynchronous run loop (``coordinator/run/async_loop.py``) with its real
scheduler, verifier, judge, outer step, blob store and ledger (SQLite or PostgreSQL) drives
``--nodes`` simulated nodes in this process through the same ``Transport`` interface the
Flower transport implements. Each node is the fake network's honest node
(``tests/unit/fake_network.py``): it runs ``node.worker.do_work`` for real on the test run's
tiny model (signed update, compressed payload uploaded by digest), so every reply is one the
verifier must really check. Nodes take *simulated* time (a lease of ``tokens / speed`` fake
seconds, speeds spread over 1x-4x), so replies arrive as they would from a fleet; the node's
own compute happens when the lease is sent and is taken off the coordinator's clock.

The replies' own checks run in the checker process beside the loop (``--check-processes``,
the run's default 1; 0 runs them in the loop): while it holds work, the loop's idle sleeps
take real time, as they would on a real network (otherwise simulated time would race past a
checker that only gets the coordinator's working time); ``checker_busy`` is its busy share
of the simulated run.

What is measured is the coordinator alone, on its clock (real time minus the nodes' compute
and the real sleeps):

- ``lease_p50_ms`` / ``lease_p99_ms``: from a reply arriving (the transport's poll handing it
  over) to the node's next lease being sent — what a node waits between two leases. The
  first fan-out (every node's first lease) is reported apart as ``fanout_s``;
- ``wait_p50_ms`` / ``wait_p99_ms``: from the node being done (its reply ready for the
  loop's poll) to its next lease — the latency plus the wait for the next poll (the loop
  sleeps 0.2 s when idle, and a step in progress holds the poll);
- ``leases_per_s``, ``updates_per_s`` (train replies verified per coordinator second),
  ``ledger_writes_per_s`` and ``ledger_write_ms_p50`` (the loop's write transactions),
  ``coordinator_cpu_s`` and ``rss_mb``;
- ``slow_leases``: the leases that waited over 50 ms (the goal's p99), their total wait, and
  how much of it each of the loop's stages took (pump: taking and screening replies;
  prepare: the replies' own checks; step; lease; eligible: who is online);
- where the time goes: ``time_s`` per stage, from the coordinator's own metrics histograms
  (screening replies, judging steps, outer steps, ledger writes) and the loop's total;
- ``leases_issued`` and ``leases_accounted`` (answered + expired + failed + handed back in
  the ledger): they must be equal when the run ends.

    python bench/scale.py                           # 1,000 nodes, SQLite
    python bench/scale.py --ledger postgresql       # the same on PostgreSQL
    python bench/scale.py --nodes 100 --steps 2 --json
    python bench/scale.py --profile 25              # cProfile's top functions (slower)

Run on demand; a small run is in the test suite (``tests/unit/test_scale_bench.py``).
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import heapq
import itertools
import json
import pstats
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "unit")]

from fake_network import T0, FakeNode, work_seconds  # noqa: E402
from loop_world import build_test_corpus, run_toml  # noqa: E402
from pg_schema import bench_ledger_url  # noqa: E402

from coordinator import metrics  # noqa: E402
from coordinator.accounting.credits import ReceiptIssuer  # noqa: E402
from coordinator.config import parse_config  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from coordinator.run.async_loop import make_run_loop  # noqa: E402
from coordinator.run.model_store import ModelStore  # noqa: E402
from coordinator.run.transport import Outgoing, Reply  # noqa: E402
from protocol.blobstore import BlobDir  # noqa: E402
from protocol.messages import parse_work  # noqa: E402
from protocol.signing import fingerprint, generate_key, public_key_pem  # noqa: E402

LEASE_S = 60.0  # fake seconds a 1x node's lease takes: small, realistic leases
INNER_STEPS = 2
STEP_TOKENS = 2 * 32  # the test run's batch_size x seq_len


@dataclass
class _Due:
    fid: int
    at: float  # fake time the reply is ready
    reply: Any
    error: str | None


class SimClock:
    """Simulated time that runs with the coordinator: its own working time (real time less
    the nodes' compute, ``coord()``) plus the time it sleeps, which passes at once. A
    coordinator that falls behind sees replies pile up, as it would on a real network."""

    def __init__(self, start: float = T0) -> None:
        self.node_s = 0.0  # real seconds spent computing the nodes' replies
        self.slept = 0.0
        self.really_slept = 0.0
        # while work beside the loop is out (the checker processes), a sleep takes real
        # time: it would on a real network, and the work beside needs it to get done
        self.real_sleep: Callable[[], bool] = lambda: False
        self._start, self._c0 = start, self.coord()

    def coord(self) -> float:
        return time.perf_counter() - self.node_s - self.really_slept

    def __call__(self) -> float:
        return self._start + (self.coord() - self._c0) + self.slept

    def sleep(self, dt: float) -> None:
        if self.real_sleep():
            t = time.perf_counter()
            time.sleep(dt)
            self.really_slept += time.perf_counter() - t
        self.slept += dt


@dataclass
class ScaleTransport:
    """``coordinator.run.transport.Transport`` over many in-process nodes.

    A node computes its reply when the lease is sent (its compute time goes to
    ``clock.node_s``, off the coordinator's clock) and the reply is handed over once its
    simulated work is done.
    """

    nodes: dict[int, FakeNode]
    clock: SimClock
    blobs: BlobDir
    # whether a train lease sent now counts: not in the last step, when the loop leases no
    # more than the run still needs and a node that answered may rightly wait for nothing
    counting: Callable[[], bool] = lambda: True
    node_cpu_s: float = 0.0
    # (reply arrived, next lease sent) on the coordinator's clock: the lease latencies
    spans: list[tuple[float, float]] = field(default_factory=list)
    # simulated seconds from a reply being ready (the node done) to its next lease: the
    # latency plus the wait for the loop's next poll (its 0.2 s sleep, a step in progress)
    waits: list[float] = field(default_factory=list)
    fanout: list[float] = field(default_factory=list)  # coord times of first leases
    sends: int = 0
    _online: list[int] = field(default_factory=list)
    _due: dict[str, _Due] = field(default_factory=dict)
    _order: list[tuple[float, str]] = field(default_factory=list)  # heap of (due at, message)
    _arrived: dict[int, float] = field(default_factory=dict)  # fid -> coord time of a reply
    _ready: dict[int, float] = field(default_factory=dict)  # fid -> simulated time it was due
    _started: set[int] = field(default_factory=set)  # fids that had a lease
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self._online = sorted(self.nodes)

    def coord(self) -> float:
        return self.clock.coord()

    def online(self) -> list[int]:
        return list(self._online)

    def send(self, msgs: Sequence[Outgoing]) -> list[str]:
        return [self._send_one(m.dst, m.kind, m.content, m.ttl) for m in msgs]

    def _send_one(self, dst: int, kind: str, content: Any, ttl: float) -> str:
        now = self.coord()
        ready = self._ready.pop(dst, None)
        if (arrived := self._arrived.pop(dst, None)) is not None:
            if kind == "train" and self.counting():
                self.spans.append((arrived, now))
                if ready is not None:
                    self.waits.append(self.clock() - ready)
        elif dst not in self._started:
            self.fanout.append(now)
        self._started.add(dst)
        self.sends += 1
        node = self.nodes[dst]
        node.blobs = self.blobs
        # both clocks read inside the node's window: a process_time() call costs ~0.5 ms
        # with torch's threads about, and one after it was charged to the coordinator; the
        # bench's own parse of the work (for its simulated duration) is in it too
        t, c = time.perf_counter(), time.process_time()
        lease = parse_work(content).lease
        reply, error = node.answer(kind, content)
        self.node_cpu_s += time.process_time() - c
        self.clock.node_s += time.perf_counter() - t
        begin = max(self.clock(), node.free_at)
        node.free_at = begin + work_seconds(lease, node.speed or 1.0)
        mid = f"msg-{next(self._ids)}"
        self._due[mid] = _Due(dst, node.free_at, reply, error)
        heapq.heappush(self._order, (node.free_at, mid))
        return mid

    def poll(self, msg_ids: Collection[str]) -> list[Reply]:
        # the replies due, earliest first (a scan of every message out per poll was ~0.5
        # ms of the bench's own time counted as the coordinator's at 1,000 nodes)
        now, out, wanted = self.clock(), [], None
        while self._order and self._order[0][0] <= now:
            mid = heapq.heappop(self._order)[1]
            wanted = set(msg_ids) if wanted is None else wanted
            if mid not in wanted:  # a message the loop gave up on: its reply never comes
                continue
            due = self._due.pop(mid)
            out.append(Reply(mid, due.fid, due.reply, due.error))
            self._ready[due.fid] = due.at
        arrived = self.coord()
        for r in out:
            self._arrived[r.src] = arrived
        return out


def enroll_many(ledger: Ledger, n: int, institutions: int, seed: int) -> dict[int, FakeNode]:
    """``n`` honest nodes spread over ``institutions``, speeds 1x-4x (log-uniform)."""
    rng = random.Random(seed)
    insts = [ledger.add_institution(f"University {i:03d}") for i in range(institutions)]
    base_speed = INNER_STEPS * STEP_TOKENS / LEASE_S
    nodes = {}
    for i in range(n):
        key = generate_key()
        pem = public_key_pem(key)
        fid = 100_000 + i
        inst = insts[i % institutions]
        assert inst.id is not None
        row = ledger.add_node(fid, f"gpu-{i:04d}", inst.id, pem, fingerprint(pem))
        node = FakeNode(f"gpu-{i:04d}", fid, key, row, seed=i)
        node.speed = base_speed * 2 ** rng.uniform(0, 2)
        nodes[fid] = node
    return nodes


def _ledger_counts(ledger: Ledger) -> tuple[dict[str, int], int, int]:
    """Leases by status; train updates judged, and accepted."""
    counts: dict[str, int] = {}
    kinds = {}
    for row in ledger.leases():
        counts[row.status] = counts.get(row.status, 0) + 1
        kinds[row.id] = row.kind
    train = [u for u in ledger.updates() if kinds.get(u.lease_id) == "train"]
    return counts, len(train), sum(1 for u in train if u.verdict == "accepted")


_RUN_TABLES = ("leases", "updates", "credit_entries", "credit_receipts", "events",
               "model_versions", "version_evals")


def _rows(ledger: Ledger) -> dict[str, int]:
    """Rows per table the run wrote (what a day of it costs the ledger)."""
    from sqlalchemy import text

    with ledger._session() as session:  # noqa: SLF001 - a benchmark's count, read-only
        return {t: int(session.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in _RUN_TABLES}


class Phases:
    """Where the loop was while a node waited for its next lease: each of the loop's stages
    timed on the coordinator's clock, and the time of the slowest leases split over them."""

    # the loop's methods, and the roster's read of who is online
    STAGES = ("_pump", "_prepare", "_step", "_lease", "_evaluate_if_due")

    def __init__(self, loop: Any, clock: Callable[[], float]) -> None:
        self.clock, self.log = clock, []  # (stage, start, end)
        for name in self.STAGES:
            self._wrap(loop, name, name)
        self._wrap(loop.roster, "eligible", "eligible")

    def _wrap(self, owner: Any, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = self.clock()
            try:
                return inner(*args, **kw)
            finally:
                self.log.append((stage, t0, self.clock()))
        setattr(owner, name, timed)

    def blame(self, spans: list[tuple[float, float]], above_s: float) -> dict[str, Any]:
        """For the leases that waited longer than ``above_s``: how many, and the seconds of
        their waits each stage took (a stage inside another counts for both)."""
        slow = [(a, b) for a, b in spans if b - a > above_s]
        log = sorted(self.log, key=lambda e: e[1])
        t0s = [t0 for _, t0, _ in log]
        out: dict[str, float] = {}
        longest = max((t1 - t0 for _, t0, t1 in log), default=0.0)
        for a, b in slow:
            lo = bisect.bisect_left(t0s, a - longest)
            for name, t0, t1 in log[lo:bisect.bisect_right(t0s, b)]:
                if (o := min(b, t1) - max(a, t0)) > 0:
                    out[name] = out.get(name, 0.0) + o
        return {"leases": len(slow), "wait_s": round(sum(b - a for a, b in slow), 3),
                "by_stage_s": {k.lstrip("_"): round(v, 3) for k, v in sorted(out.items())}}


def _hist(h: Any, *labels: str) -> tuple[float, int]:
    """(sum of seconds, count) of a histogram (child) since the process started."""
    m = h.labels(*labels) if labels else h
    total, count = 0.0, 0
    for metric in m.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = int(s.value)
    return total, count


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(nodes_n: int, steps: int, url: str, tmp: Path, *, institutions: int = 50,
        seed: int = 0, profile: int = 0, verify: str = "", train_keys: str = "",
        check_processes: int = 1) -> dict[str, Any]:
    """One run of ``nodes_n`` nodes for ``steps`` outer steps on the ledger at ``url``;
    ``verify`` and ``train_keys`` hold [verify] and [train] keys (the run's defaults
    otherwise); ``check_processes`` run the replies' own checks beside the loop (0: in it)."""
    ledger_kind = "postgresql" if url.startswith("postgresql") else "sqlite"
    # shards enough for every node's lease out and its last one waiting in the buffer
    corpus = build_test_corpus(tmp / "corpus", files=max(20, nodes_n // 8))
    cfg = parse_config(run_toml(
        steps, train=f"inner_steps = {INNER_STEPS}\ndeadline_s = {20 * LEASE_S:g}\n{train_keys}",
        # the run's own verification defaults (spot checks, eval quorum) stay on
        verify=f"check_processes = {check_processes}\n{verify}", extra="[async]\nenabled = true\neval_every = 1000\n",
        run_id="scale"), tmp)
    ledger = Ledger(url)
    t = time.perf_counter()
    nodes = enroll_many(ledger, nodes_n, min(institutions, nodes_n), seed)
    enroll_s = time.perf_counter() - t
    clock = SimClock()
    blobs = BlobDir(tmp / "blobs")
    transport = ScaleTransport(nodes, clock, blobs)
    store = ModelStore.open(tmp / "checkpoints", cfg, ledger)
    transport.counting = lambda: store.version < steps - 1
    loop = make_run_loop(cfg, ledger, transport, store, corpus, clock=clock,
                         sleep=clock.sleep, rng=random.Random(seed), blobs=blobs,
                         issuer=ReceiptIssuer(generate_key()))  # receipts signed, as live
    phases = Phases(loop, transport.coord)
    checker = loop.checker
    if checker is not None:
        clock.real_sleep = lambda: checker.pending > 0
    before = {k: _hist(*k) for k in _STAGES}
    writes0 = _hist(metrics.LEDGER_WRITE_SECONDS)
    cpu0, t0 = time.process_time(), transport.coord()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    loop.run()
    if prof:
        prof.disable()
    wall = transport.coord() - t0
    cpu = time.process_time() - cpu0 - transport.node_cpu_s
    counts, train, accepted = _ledger_counts(ledger)
    issued = sum(counts.values())
    accounted = issued - counts.get("issued", 0)  # answered, expired, failed, handed back
    writes = _hist(metrics.LEDGER_WRITE_SECONDS)
    n_writes = writes[1] - writes0[1]
    latencies = [b - a for a, b in transport.spans]
    out: dict[str, Any] = {
        "nodes": nodes_n, "ledger": ledger_kind, "steps": steps, "verify": verify,
        "train_keys": train_keys,
        "lease_p50_ms": round(1000 * _pct(latencies, 0.50), 2),
        "lease_p99_ms": round(1000 * _pct(latencies, 0.99), 2),
        "lease_max_ms": round(1000 * max(latencies, default=float("nan")), 2),
        "wait_p50_ms": round(1000 * _pct(transport.waits, 0.50), 2),
        "wait_p99_ms": round(1000 * _pct(transport.waits, 0.99), 2),
        "fanout_s": round(transport.fanout[-1] - t0, 3) if transport.fanout else None,
        "leases_issued": issued, "leases_accounted": accounted,
        "lease_statuses": counts,
        "leases_per_s": round(issued / wall, 1),
        "updates_per_s": round(train / wall, 1),
        "updates_accepted": accepted,
        "ledger_writes": n_writes, "ledger_writes_per_s": round(n_writes / wall, 1),
        "ledger_write_ms_mean": round(1000 * (writes[0] - writes0[0]) / max(1, n_writes), 3),
        "coordinator_s": round(wall, 2), "coordinator_cpu_s": round(cpu, 2),
        "nodes_s": round(clock.node_s, 2), "slept_s": round(clock.slept, 1),
        "really_slept_s": round(clock.really_slept, 1),
        "enroll_s": round(enroll_s, 2),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "version": store.version,
        "time_s": {name: round(_hist(*k)[0] - before[k][0], 3)
                   for name, k in zip(_STAGE_NAMES, _STAGES)},
    }
    # the replies' own checks (base check, usefulness scores) the loop ran between passes
    out["time_s"]["checks"] = round(loop.judge.cost.checks_s, 3)
    out["time_s"]["ledger_writes"] = round(writes[0] - writes0[0], 3)
    # beside the loop, on their own cores: busy for this share of the coordinator's time
    out["check_processes"] = check_processes
    if checker is not None:
        out["time_s"]["checker"] = round(checker.busy_s, 3)
        # of the simulated run (what a real network's coordinator would have had)
        out["checker_busy"] = round(checker.busy_s / check_processes
                                    / max(wall + clock.slept, 1e-9), 3)
    out["slow_leases"] = phases.blame(transport.spans, 0.05)  # the goal: p99 < 50 ms
    out["ledger_rows"] = _rows(ledger)
    out["ledger_rows_per_lease"] = round(sum(out["ledger_rows"].values()) / max(1, issued), 2)
    ledger.close()
    if prof:
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(profile)
    return out


_STAGES = [(metrics.VERIFY_SECONDS, "screen"), (metrics.VERIFY_SECONDS, "judge"),
           (metrics.OUTER_STEP_SECONDS,)]
_STAGE_NAMES = ["screen", "judge", "outer_step"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=4,
                   help="outer steps (each takes as many updates as nodes are online)")
    p.add_argument("--ledger", choices=("sqlite", "postgresql", "both"), default="sqlite")
    p.add_argument("--institutions", type=int, default=50)
    p.add_argument("--verify", default="", help="[verify] keys, ';'-separated, e.g. "
                   "'usefulness_tokens = 0' (the scores left to validators)")
    p.add_argument("--train", default="", help="[train] keys, ';'-separated, e.g. "
                   "'target_lease_s = 60' (leases sized to each node's measured speed)")
    p.add_argument("--check-processes", type=int, default=1, metavar="N",
                   help="processes beside the loop for the replies' own checks (0: in the "
                        "loop, as before [verify] check_processes existed)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print cProfile's top N functions by cumulative time")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    torch.set_num_threads(1)
    kinds = ("sqlite", "postgresql") if a.ledger == "both" else (a.ledger,)
    results = []
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp, bench_ledger_url(kind, Path(tmp), "scale") as url:
            r = run(a.nodes, a.steps, url, Path(tmp), institutions=a.institutions,
                    profile=a.profile, verify=a.verify.replace(";", "\n"),
                    train_keys=a.train.replace(";", "\n"),
                    check_processes=a.check_processes)
        results.append(r)
        print(f"{kind}: {r['nodes']} nodes, {r['leases_issued']} leases "
              f"({r['leases_accounted']} accounted), lease p50 {r['lease_p50_ms']} ms "
              f"p99 {r['lease_p99_ms']} ms, {r['updates_per_s']} updates/s, "
              f"{r['ledger_writes_per_s']} ledger writes/s, coordinator "
              f"{r['coordinator_s']} s ({r['coordinator_cpu_s']} s CPU), time {r['time_s']}",
              file=sys.stderr)
    out = dict(results[0])
    if len(results) > 1:
        out["runs"] = results
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The train replies' own checks in processes beside the run loop.

A reply's own checks (``RoundJudge.plan``: the base check's forward pass, the usefulness
scores) are most of the coordinator's work: three forward passes per update. Run in the
loop they kept every node that answered meanwhile waiting for its next lease
(``bench/scale.py``: lease p99 157-369 ms at 1,000 nodes). Here they run in separate
processes — not threads: a thread held the GIL in Python most of the time on a small model
and slowed the loop down — so the loop only screens, leases and steps, and a node's next
lease never waits for anyone's scores. An outer step takes only checked replies, so the
checks pace the steps, not the leases.

A job is small: corpus offsets, the base version's digest and the update's payload digest
(each process reads the run's corpus and blob store itself, as a validator elsewhere would,
and decodes the payload the loop already checked); only an update that came inside its
message travels as arrays.
A process that dies or fails a job gives an error result; the loop then runs those checks
itself (``CheckResult.error``), so nothing waits forever and nothing is judged unchecked.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import multiprocessing as mp
import queue
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from protocol.blobstore import BlobDir
from protocol.compression import Compression, decode
from protocol.digest import arrays_from_bytes
from training.corpus import CorpusInfo
from training.families import ModelSpec

from coordinator.verify.scoring import CheckJob, CheckResult, Scorer

__all__ = ["Checker"]

log = logging.getLogger(__name__)

_BASES = 4  # base versions a process keeps decoded (replies are at most a few behind)
_KEEP_VERSIONS = 8  # base losses a process keeps cached, by version
_JOIN_S = 5.0
_PARENT_S = 0.25  # how often an idle checker looks whether its coordinator is still there
_NEAR = 1 << 14  # keys remembered (leases out at once, with room)


class Checker:
    """``processes`` checker processes, started by ``start`` or the first job (spawned: the
    coordinator may run gRPC threads, which a fork would copy half-way)."""

    def __init__(self, spec: ModelSpec, corpus: CorpusInfo, blobs: Path, *, seq_len: int,
                 batch_size: int, processes: int = 1,
                 compression: Compression = Compression("none")) -> None:
        self._args = (spec, corpus, str(blobs), seq_len, batch_size, compression)
        self._n = processes
        self._procs: list[Any] = []
        self._jobs: list[Any] = []
        self._results: Any = None
        self._ids = itertools.count()
        self._out: dict[int, int] = {}  # job id -> the process that has it
        self._failed: list[tuple[int, CheckResult]] = []  # not sent: no process alive
        self._near: OrderedDict[str, int] = OrderedDict()  # key -> the process its jobs go to
        self.busy_s = 0.0  # seconds the processes spent checking (the checks' own cost)
        self.jobs_done = 0

    @property
    def pending(self) -> int:
        """Jobs submitted whose results have not been taken."""
        return len(self._out)

    @property
    def started(self) -> bool:
        return bool(self._procs)

    @property
    def dead(self) -> bool:
        """Started, and every process has exited."""
        return bool(self._procs) and not any(p.is_alive() for p in self._procs)

    def start(self) -> None:
        """Start the processes now, if they are not running yet: a spawn and ``import
        torch`` take seconds, which the first reply's checks should not wait for."""
        if not self._procs:
            self._start()

    def submit(self, job: CheckJob, key: str | None = None) -> int:
        """Queue ``job``; returns its id (``results`` hands back the id and its result).
        Jobs of one ``key`` (a lease's nonce) go to the same process while it lives: the
        base's losses a lease's first job computed are cached there for its reply's."""
        self.start()
        jid = next(self._ids)
        live = [i for i, p in enumerate(self._procs) if p.is_alive()]
        if not live:
            self._fail(jid, "no checker process is running")
            return jid
        i = self._near.get(key) if key is not None else None
        if i not in live:
            load = {k: 0 for k in live}
            for k in self._out.values():
                if k in load:
                    load[k] += 1
            i = min(live, key=lambda k: load[k])
        if key is not None:
            self._near[key] = i
            self._near.move_to_end(key)
            while len(self._near) > _NEAR:
                self._near.popitem(last=False)
        self._out[jid] = i
        self._jobs[i].put((jid, job))  # a feeder thread pickles and writes: never blocks
        return jid

    def results(self, wait_s: float = 0.0) -> list[tuple[int, CheckResult]]:
        """The results in so far; waits up to ``wait_s`` for a first one (``math.inf``:
        for every job out). A job whose process died comes back as an error."""
        out, self._failed = self._failed, []
        end = time.monotonic() + wait_s
        while self._out:
            try:
                jid, res, busy = self._results.get_nowait()
            except queue.Empty:
                if self._reap(out):
                    continue
                left = end - time.monotonic()
                if left <= 0 or (out and wait_s != math.inf):
                    break
                try:
                    jid, res, busy = self._results.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
            if self._out.pop(jid, None) is not None:
                self.busy_s += busy
                self.jobs_done += 1
                out.append((jid, res))
        return out

    def close(self) -> None:
        """Stop the processes (each finishes its current job) and reap them."""
        for q in self._jobs:
            q.put(None)
        for p in self._procs:
            p.join(_JOIN_S)
            if p.is_alive():
                p.kill()
                p.join(_JOIN_S)
        for q in [*self._jobs, self._results]:
            if q is not None:
                q.close()
                q.cancel_join_thread()  # a dead reader must not hang our exit
        self._procs, self._jobs, self._results = [], [], None

    # -- inside -------------------------------------------------------------------------

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        for i in range(self._n):
            jobs = ctx.Queue()
            p = ctx.Process(target=_serve, args=(*self._args, jobs, self._results),
                            name=f"atom-checker-{i}", daemon=True)
            p.start()
            self._jobs.append(jobs)
            self._procs.append(p)
        log.info("started %d checker process(es)", self._n)

    def _fail(self, jid: int, why: str) -> None:
        self._failed.append((jid, CheckResult(error=why)))

    def _reap(self, out: list[tuple[int, CheckResult]]) -> bool:
        """Fail the jobs of processes that died; True if there were any."""
        dead = {i for i, p in enumerate(self._procs) if not p.is_alive()}
        lost = [jid for jid, i in self._out.items() if i in dead]
        for jid in lost:
            i = self._out.pop(jid)
            out.append((jid, CheckResult(error=f"checker process {i} exited "
                                               f"(code {self._procs[i].exitcode})")))
        return bool(lost)


def _serve(spec: ModelSpec, corpus: CorpusInfo, blob_root: str, seq_len: int,
           batch_size: int, compression: Compression, jobs: Any, results: Any) -> None:
    """A checker process: run jobs until a None comes."""
    import torch

    torch.set_num_threads(1)  # one core each: the loop keeps its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the loop, which stops us
    blobs = BlobDir(blob_root)
    bases: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def base_of(version: int, digest: str) -> dict[str, np.ndarray]:
        if digest not in bases:
            bases[digest] = arrays_from_bytes(blobs.view(digest))
            while len(bases) > _BASES:
                bases.popitem(last=False)
        bases.move_to_end(digest)
        return bases[digest]

    scorer = Scorer(spec, corpus.tokens(), seq_len, batch_size, base_of)
    newest = 0
    parent = mp.parent_process()
    while True:
        # a coordinator killed with -9 sends no None: stop once it is gone (an orphan would
        # wait on its queue for ever)
        if parent is not None and not parent.is_alive():
            return
        try:
            item = jobs.get(timeout=_PARENT_S)
        except queue.Empty:
            continue
        if item is None:
            return
        jid, job = item
        t0 = time.perf_counter()
        try:
            res = scorer.run(_with_update(job, blobs, compression, base_of))
        except Exception as e:  # noqa: BLE001 - the loop runs this job's checks itself
            res = CheckResult(error=f"{type(e).__name__}: {e}")
        if job.base_version > newest:
            newest = job.base_version
            scorer.forget(newest - _KEEP_VERSIONS)
        results.put((jid, res, time.perf_counter() - t0))


def _with_update(job: CheckJob, blobs: BlobDir, compression: Compression,
                 base_of: Any) -> CheckJob:
    """``job`` with its update's arrays: decoded from the payload blob it names, shaped as
    its base version (the loop decoded and checked the same bytes before it sent the job)."""
    if job.update_digest is None:
        return job
    base = base_of(job.base_version, job.base_digest)
    shapes = {k: (v.shape, v.dtype.str) for k, v in base.items()}
    update = decode(arrays_from_bytes(blobs.view(job.update_digest)), compression, shapes,
                    math.inf)
    return dataclasses.replace(job, update=update, update_digest=None)

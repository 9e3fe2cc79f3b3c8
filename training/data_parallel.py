"""The inner loop data-parallel over W processes (one per GPU; gloo CPU processes in tests).

Every rank draws the SAME global batches ``train_inner`` draws for the lease (the sampler is
seeded by the lease alone) and trains on its own contiguous slice of rows: rank r of W takes
rows ``[r * B/W, (r + 1) * B/W)``. The model's loss is the mean over the slice's tokens and
every slice has as many tokens, so the mean of the W slice gradients is the gradient of the
global batch: the gradients are summed with one ``all_reduce`` per bucket and divided by W,
then every rank clips and steps the same AdamW on the same gradient and so holds the same
weights. Rank 0 returns what ``train_inner`` returns: on CPU in fp32 the pseudo-gradient
matches one process's to float reduction order (tests/unit/test_data_parallel.py).

``InnerPool`` keeps the W processes (and their CUDA contexts and built, on CUDA compiled,
models: ``training.model_cache``) for many leases: the caller
sends each lease to rank 0 through a queue, rank 0 broadcasts it to the others over the
process group, and only rank 0 answers. A rank that dies or raises fails the lease with one
``DataParallelError`` naming each rank's fate; the pool then reaps every rank and the next
lease starts fresh ones. The process group's timeout bounds any collective a hung peer would
block.
``train_inner_parallel`` is the one-lease form: start a pool, run, close.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protocol.processes import free_port
from training.families import ModelSpec
from training.inner import (
    GRAD_CLIP, InnerResult, _fp32_loss, check_inner_args, inner_optimizer, inner_result,
    sample_batch,
)
from training.model_cache import ModelCache, forward_backward

__all__ = ["DataParallelError", "InnerPool", "check_world_batch", "train_inner_parallel"]

Progress = Callable[[int, int, int], None]

_GO = "go"  # ranks > 0: join rank 0's broadcast of the next lease
_BUCKET = 1 << 25  # gradient elements per all_reduce: 128 MiB of fp32 extra, at most
_POLL_S = 0.2


class DataParallelError(RuntimeError):
    """A rank of an ``InnerPool`` died, raised or timed out; its ranks are reaped."""


def check_world_batch(batch_size: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` splits evenly over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} does not split over {world_size} GPUs: it must be a "
            f"multiple of {world_size} (use --gpus with a divisor of the run's batch size)"
        )


class InnerPool:
    """W long-lived processes that run ``train_inner`` leases data-parallel.

    Parameters
    ----------
    world_size
        Processes: one per GPU on CUDA (rank r uses ``cuda:r``).
    device
        "cuda" (NCCL) or "cpu" (gloo).
    threads
        torch intra-op threads per rank (None: torch's default).
    timeout_s
        The process group's timeout: how long a collective waits for a peer.
    use_compile
        Each rank's ``ModelCache(use_compile=...)``: None compiles on CUDA only.
    """

    def __init__(self, world_size: int, device: str = "cuda", *, threads: int | None = None,
                 timeout_s: float = 300.0, use_compile: bool | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.world_size = world_size
        self.device = device
        self._threads = threads
        self._timeout_s = timeout_s
        self._use_compile = use_compile
        self._procs: list[Any] = []
        self._control: list[Any] = []
        self._results: Any = None
        self._abort: Any = None

    def __enter__(self) -> InnerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.exitcode is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, by rank (empty when not running)."""
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Spawn the ranks and wait until every one has joined the process group."""
        if self._procs:
            return
        ctx = mp.get_context("spawn")  # fork would copy a parent's CUDA context: not allowed
        self._results = ctx.Queue()
        self._abort = ctx.Event()
        self._control = [ctx.Queue() for _ in range(self.world_size)]
        addr = ("127.0.0.1", free_port())
        for rank in range(self.world_size):
            p = ctx.Process(target=_rank_main, daemon=True, name=f"atom-dp-rank{rank}",
                            args=(rank, self.world_size, addr, self.device, self._threads,
                                  self._timeout_s, self._use_compile, self._control[rank],
                                  self._results, self._abort))
            p.start()
            self._procs.append(p)
        ready = 0
        while ready < self.world_size:
            if self._next()[0] == "ready":
                ready += 1

    def run(self, base: Mapping[str, np.ndarray], cfg: ModelSpec, tokens: np.ndarray, *,
            steps: int, batch_size: int, seq_len: int, lr: float, weight_decay: float,
            seed: int, progress: Progress | None = None,
            checkpointing: bool = False) -> InnerResult:
        """One lease, as ``train_inner`` with the same arguments (less device/opt state).

        ``progress`` runs here, in the caller's process, as rank 0 finishes each step; if it
        raises (``node.pause.Paused``), the ranks stop together after the step in flight,
        the pool stays up, and the exception is re-raised here.

        Raises
        ------
        ValueError
            As ``train_inner``, or if ``batch_size`` does not split over the ranks.
        DataParallelError
            If a rank died, raised or timed out (every rank is then reaped; the next call
            starts fresh ones).
        """
        check_inner_args(cfg, len(tokens), steps=steps, batch_size=batch_size, seq_len=seq_len)
        check_world_batch(batch_size, self.world_size)
        if not self._procs:
            self.start()  # the first lease, or the first after a failure: fresh processes
        elif not self.alive:
            self._fail({})
        job = dict(base=base, cfg=cfg, tokens=np.asarray(tokens), steps=steps,
                   batch_size=batch_size, seq_len=seq_len, lr=lr, weight_decay=weight_decay,
                   seed=seed, checkpointing=checkpointing)
        self._abort.clear()
        self._control[0].put(job)
        for q in self._control[1:]:
            q.put(_GO)
        raised: BaseException | None = None
        while True:
            msg = self._next()
            if msg[0] == "progress":
                if progress is not None and raised is None:
                    try:
                        progress(*msg[1:])
                    except BaseException as exc:  # noqa: BLE001 - re-raised once ranks stop
                        raised = exc
                        self._abort.set()
            elif msg[0] == "done":
                if raised is not None:
                    raise raised
                return msg[1]
            elif msg[0] == "stopped":
                assert raised is not None
                raise raised

    def close(self) -> None:
        """Stop the ranks (at once if one has failed); idempotent."""
        if not self._procs:
            return
        if self.alive:
            for q in self._control:
                q.put(None)
            deadline = time.monotonic() + 10.0
            for p in self._procs:
                p.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.exitcode is None:
                p.kill()
        for p in self._procs:
            p.join(5.0)
        self._procs = []

    def _next(self) -> tuple[Any, ...]:
        """The next message from the ranks; on a dead rank or an error, the pool's failure."""
        while True:
            try:
                msg = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.alive:
                    self._fail({})
                continue
            if msg[0] == "error":
                self._fail({msg[1]: msg[2]})
            return msg

    def _fail(self, errors: dict[int, str]) -> None:
        # A dead peer makes the others' collectives fail too: let them report, so the error
        # names the rank that failed first along with the ones that followed.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(p.exitcode is None for p in self._procs):
            self._drain(errors)
        self._drain(errors)
        self._kill_and_collect(errors)
        raise DataParallelError("data-parallel training failed: " + "; ".join(
            f"rank {r}: {why}" for r, why in sorted(errors.items())))

    def _drain(self, errors: dict[int, str]) -> None:
        try:
            while True:
                msg = self._results.get(timeout=0.05)
                if msg[0] == "error":
                    errors.setdefault(msg[1], msg[2])
        except queue.Empty:
            pass

    def _kill_and_collect(self, errors: dict[int, str]) -> None:
        for rank, p in enumerate(self._procs):
            code = p.exitcode
            if rank in errors or code is None or code == 0:
                continue
            errors[rank] = (f"killed by {signal.Signals(-code).name}" if code < 0
                            else f"exited with code {code}")
        self._kill()


def train_inner_parallel(world_size: int, base: Mapping[str, np.ndarray], cfg: ModelSpec,
                         tokens: np.ndarray, *, device: str = "cuda",
                         threads: int | None = None, timeout_s: float = 300.0,
                         **kwargs: Any) -> InnerResult:
    """One lease on a pool started and closed for it (``InnerPool.run`` for the arguments)."""
    check_world_batch(kwargs.get("batch_size", 0), world_size)
    with InnerPool(world_size, device, threads=threads, timeout_s=timeout_s) as pool:
        return pool.run(base, cfg, tokens, **kwargs)


# --- in each rank's process ---------------------------------------------------------------

def _rank_main(rank: int, world: int, addr: tuple[str, int], device: str, threads: int | None,
               timeout_s: float, use_compile: bool | None, control: Any, results: Any,
               abort: Any) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        os.environ.update(MASTER_ADDR=addr[0], MASTER_PORT=str(addr[1]))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        # Leases travel over gloo even beside NCCL: pickled arrays need no trip to the GPU.
        objects = dist.new_group(backend="gloo") if dev.type == "cuda" else None
        results.put(("ready", rank))
        models = ModelCache(use_compile=use_compile)  # each rank builds (compiles) it once
        while (msg := control.get()) is not None:
            box = [msg if rank == 0 else None]
            dist.broadcast_object_list(box, src=0, group=objects)
            report = (lambda *a: results.put(("progress", *a))) if rank == 0 else None
            res = _train_rank(box[0], rank, world, dev, abort if rank == 0 else None, report,
                              models)
            if rank == 0:
                results.put(("done", res) if res is not None else ("stopped",))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the pool, then this rank exits
        first = (str(exc).splitlines() or [""])[0][:300]
        results.put(("error", rank, f"{type(exc).__name__}: {first}"))
        raise SystemExit(1) from None


def _train_rank(job: dict[str, Any], rank: int, world: int, dev: torch.device, abort: Any,
                report: Progress | None, models: ModelCache) -> InnerResult | None:
    """``train_inner`` on this rank's slice of each batch; None on ranks > 0 and when
    rank 0's ``abort`` stopped the lease."""
    t0 = time.perf_counter()
    base, cfg = job["base"], job["cfg"]
    steps, batch_size, seq_len, seed = (job[k] for k in ("steps", "batch_size", "seq_len",
                                                         "seed"))
    share = batch_size // world
    rows = slice(rank * share, (rank + 1) * share)
    data = torch.from_numpy(np.asarray(job["tokens"], dtype=np.int64)).to(dev)
    gen = torch.Generator().manual_seed(seed)  # as train_inner: the lease's global batches
    losses = torch.zeros(steps + 1, dtype=torch.float64, device=dev)  # [0]: loss_before
    with torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []):
        torch.manual_seed(seed + rank)  # dropout (if any): independent masks per slice
        built = models.load(base, cfg, dev, checkpointing=job["checkpointing"])
        model = built.module
        opt = inner_optimizer(model, job["lr"], job["weight_decay"], dev)
        params = [p for p in model.parameters() if p.requires_grad]
        x, y = sample_batch(data, batch_size, seq_len, gen)
        losses[0] = _fp32_loss(model, x[rows], y[rows])
        for step in range(1, steps + 1):
            if step > 1:
                x, y = sample_batch(data, batch_size, seq_len, gen)
            loss = forward_backward(built, x[rows], y[rows], dev)
            if _average_grads(params, world, stop=abort is not None and abort.is_set()):
                return None  # every rank saw rank 0's flag: all stop at this step
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[step] = loss.detach()
            if report is not None:
                report(step, steps, step * batch_size * seq_len)
    dist.all_reduce(losses)  # equal slices: the mean of slice means is the batch mean
    if rank != 0:
        return None
    means = (losses / world).tolist()
    return inner_result(base, model, means[0], means[1:], tokens=steps * batch_size * seq_len,
                        t0=t0)


def _average_grads(params: list[torch.nn.Parameter], world: int, *, stop: bool) -> bool:
    """Replace each gradient by its mean over the ranks; True if any rank asked to stop
    (the flag rides in the first bucket: stopping costs no extra collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    flag = torch.tensor([1.0 if stop else 0.0], dtype=grads[0].dtype, device=grads[0].device)
    stopped = False
    for i, bucket in enumerate(_buckets(grads)):
        flat = torch.cat([g.reshape(-1) for g in bucket] + ([flag] if i == 0 else []))
        dist.all_reduce(flat)
        if i == 0:
            stopped = bool(flat[-1].item() > 0)
            flat = flat[:-1]
        flat.div_(world)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))
    return stopped


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if bucket and size + g.numel() > _BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        yield bucket

"""Doing one lease: fetch what it names, train or evaluate, sign the result.

The base model and the shard come as content-addressed blobs (``node.blobs``: the node's cache,
else the mirrors the work lists, else the coordinator), each checked against the digest the
lease names before a byte is used, and against the node's limits before it is stored.

Pure library code (no Flower process machinery), so tests can run a node's work in-process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar
from dataclasses import dataclass, field

import numpy as np

from flwr.app import RecordDict

from protocol.blobstore import BlobDir
from protocol.compression import ErrorFeedback, apply_delta
from protocol.digest import arrays_from_bytes, arrays_to_bytes, digest_arrays, digest_bytes
from protocol.errors import AtomError, BlobError, ConfigError, ProtocolError
from protocol.messages import (
    EVAL_WINDOWS, MAX_REPLY_BYTES, Kind, Lease, Update, UpdateMetrics, Work, content_to_bytes,
    handback_content, parse_work, reply_content, shard_tokens,
)
from protocol.signing import sign_update
from training.data_parallel import InnerPool, train_inner_parallel
from training.device import pick_device, set_threads
from training.evaluate import evaluate
from training.families import ModelSpec, param_count
from training.inner import train_inner
from training.model_cache import ModelCache
from training.state import init_arrays

from . import metrics as node_metrics
from .blobs import BlobFetcher, BlobSink, BlobSource, HttpMirror
from .gpu import cap_memory, check_memory
from .limits import NodeLimits, check_model, check_work
from .pause import LeaseGate, Paused
from .task_lease import run_task_lease

__all__ = ["BaseModels", "WorkerSettings", "do_work"]

_T = TypeVar("_T")
log = logging.getLogger(__name__)

Progress = Callable[..., None]
Transfer = Callable[[str, int, int], None]  # (what, bytes so far, total)


@dataclass
class BaseModels:
    """The base models a warm worker used last, parsed, by digest (least recently used out).

    A lease on the version the node trained or evaluated last — the eval lease queued behind
    its train lease, every spot check — starts from memory: no disk read, no parse. Keyed by
    the digest the lease names, so a lease naming another version never sees these arrays.
    """

    keep: int = 2
    _arrays: OrderedDict[str, dict[str, np.ndarray]] = field(default_factory=OrderedDict)
    hits: int = 0

    def peek(self, digest: str) -> dict[str, np.ndarray] | None:
        return self._arrays.get(digest)

    def get(self, digest: str, load: Callable[[], dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
        if digest in self._arrays:
            self._arrays.move_to_end(digest)
            self.hits += 1
            return self._arrays[digest]
        arrays = load()
        for a in arrays.values():
            a.flags.writeable = False  # shared by every lease on this version
        self._arrays[digest] = arrays
        while len(self._arrays) > self.keep:
            self._arrays.popitem(last=False)
        return arrays


@dataclass(frozen=True)
class WorkerSettings:
    node_id: int
    key: object  # EllipticCurvePrivateKey
    threads: int = 0
    device: str = "auto"
    limits: NodeLimits = NodeLimits()
    cache: BlobDir | None = None  # where fetched blobs are kept (size-capped)
    coordinator_blobs: BlobSource | None = None  # the coordinator's FetchBlob, tried last
    # topk: what earlier updates left out, carried into the next (the caller keeps it)
    feedback: ErrorFeedback | None = None
    # where a train update's payload goes by digest (the coordinator); None: in the reply
    uploads: BlobSink | None = None
    # the parsed base models a warm worker keeps between leases; None: parse every time
    models: BaseModels | None = None
    # benchmarks (``atom-node join --slowdown``): every lease takes this many times as long,
    # the extra spent waiting after the work, and its wall_s says so: a slower device
    slowdown: float = 1.0
    # the contribution policy and the leaving signal, checked as a lease starts and between
    # its training steps (``node.pause``); None: never pause
    gate: LeaseGate | None = None
    # > 1 (``join --gpus``): train leases run data-parallel over cuda:0..gpus-1 in this
    # pool's processes, kept across leases; None with gpus > 1: a pool per lease
    gpus: int = 1
    pool: InnerPool | None = None
    # the built (on CUDA: compiled) model a warm worker reuses for every train lease of an
    # architecture; None: build one per lease
    model_cache: ModelCache | None = None
    # ``join --activation-checkpointing``: recompute activations in the backward pass, for
    # models whose activations would not fit the GPU otherwise
    checkpointing: bool = False

    def fetcher(self, mirrors: list[str]) -> BlobFetcher:
        if self.cache is None:
            raise ConfigError("this node has no blob cache configured")
        sources: list[BlobSource] = [HttpMirror(url) for url in mirrors]
        if self.coordinator_blobs is not None:
            sources.append(self.coordinator_blobs)
        return BlobFetcher(self.cache, sources, self.limits.max_work_bytes)


def do_work(content: RecordDict, settings: WorkerSettings,
            progress: Callable[[str, int, int, int], Progress] | None = None,
            transfer: Transfer | None = None) -> RecordDict:
    """Run the lease in ``content`` and return the signed reply content — or a hand-back
    (``protocol.messages.HandBack``) when the node's gate says pause, before the work or
    after the training step in progress; ``transfer`` hears how fetching each blob goes.
    Logs one ``lease {...}`` JSON line of unix times (received, work started and ended,
    replied) and ``fetch_s``, the seconds before the work spent getting blobs (the rest is
    parsing, decoding and building the model), for ``bench/throughput.py``."""
    received = time.time()
    work = parse_work(content)
    try:
        return _do_lease(work, settings, progress, transfer, received)
    except Paused as paused:
        lease = work.lease
        log.info("lease %s handed back: %s", lease.nonce, paused.reason)
        if progress is not None:  # the terminal shows the node idle, not stuck mid-lease
            progress(lease.kind, lease.round, lease.shard_id, lease.inner_steps)(
                0, lease.inner_steps, 0, done=True, note="handed back")
        return handback_content(paused.handback(lease))


def _expired(lease: Lease, received: float) -> BlobError | None:
    """What a refused upload means when the lease's deadline has passed: the coordinator
    closed the lease and takes no update for it (said plainly, not as the gRPC refusal)."""
    late = time.time() - lease.deadline
    if late <= 0:
        return None
    return BlobError(f"lease {lease.nonce[:8]} ran {late:.0f} s past its deadline "
                     f"({lease.deadline - received:.0f} s from its arrival): the coordinator "
                     f"closed it and took no update, so this lease's work is lost (a node "
                     f"busy with other work, or a [train] deadline_s too short for this "
                     f"model on this node)")


def _do_lease(work: Work, settings: WorkerSettings,
              progress: Callable[[str, int, int, int], Progress] | None,
              transfer: Transfer | None, received: float) -> RecordDict:
    times = {"received": received}
    lease, arch = work.lease, work.arch
    spec = check_work(lease, arch, settings.limits)  # before anything is fetched or allocated
    gate = settings.gate
    if gate is not None:
        cap = gate.policy.max_gpu_memory
        if cap and pick_device(settings.device).type == "cuda":
            check_memory(lease.kind, param_count(spec), cap)
        gate.check(working=False)
    blobs = settings.fetcher(work.mirrors)
    fetch_s = 0.0  # seconds in blobs.get (the prefetch thread's are its own)

    def fetch(what: str, digest: str) -> memoryview:
        nonlocal fetch_s
        report = None if transfer is None else (lambda done, total: transfer(what, done, total))
        t0 = time.perf_counter()
        data = blobs.get(digest, report)
        fetch_s += time.perf_counter() - t0
        if digest in blobs.fetched:
            log.info("fetched %s %s (%d bytes)", what, digest, len(data))
        return data

    models = settings.models

    def load_model() -> dict[str, np.ndarray]:
        held = models.peek(work.delta[0]) if models and work.delta else None
        if held is not None and (rebuilt := _rebuild(work, held, fetch)) is not None:
            return rebuilt
        if work.init_seed is not None and not blobs.cache.has(lease.base_digest) \
                and (built := _from_seed(work, spec, blobs.cache)) is not None:
            check_model(built, settings.limits)
            return built
        # The blob matched base_digest and parses only in its canonical layout, so these
        # arrays are the base model (views of the blob: nothing else allocated yet).
        arrays = arrays_from_bytes(fetch("model", lease.base_digest))
        check_model(arrays, settings.limits)
        return arrays

    def inputs() -> tuple[dict[str, np.ndarray], Any]:
        model = (load_model() if models is None else models.get(lease.base_digest, load_model))
        if lease.kind == Kind.TASKS:  # the task bundle and the tokenizer lm-eval reads with
            return model, (bytes(fetch("tasks", lease.data_digest)),
                           bytes(fetch("tokenizer", lease.tokenizer_digest)))
        return model, shard_tokens(fetch("shard", lease.data_digest), lease)

    model, data = _compiling_beside(inputs, lease, spec, settings)
    if work.prefetch:  # what the lease queued behind this one names: fetched while we work
        threading.Thread(target=_prefetch, args=(blobs, work.prefetch), daemon=True,
                         name="prefetch").start()
    if gate is not None:  # the fetch may have taken a while
        gate.check(working=False)
    times["work_start"] = time.time()
    times["fetch_s"] = fetch_s
    arrays, metrics = _compute(work, spec, model, data, settings, progress)
    times["work_end"] = time.time()
    if lease.kind == Kind.TRAIN and settings.uploads is not None:
        # bytes by digest: the payload goes up first, the signed update binds its digest,
        # and the Flower reply carries the small signed record only
        payload = arrays_to_bytes(arrays)
        digest = digest_bytes(payload)  # == digest_arrays(arrays): the canonical layout
        report = None if transfer is None else (lambda done, total: transfer("update", done,
                                                                              total))
        try:
            settings.uploads.put(digest, payload, lease.nonce, report)
        except BlobError as err:
            if (expired := _expired(lease, received)) is not None:
                raise expired from err
            raise
        update = Update(lease=lease, node_id=settings.node_id, arrays_digest=digest,
                        metrics=metrics)
        reply = reply_content(sign_update(update, settings.key), {})
    else:
        update = Update(lease=lease, node_id=settings.node_id,
                        arrays_digest=digest_arrays(arrays), metrics=metrics)
        reply = reply_content(sign_update(update, settings.key), arrays)
    if settings.uploads is not None:
        _hand_in(settings.uploads, lease.nonce, reply)
    times["replied"] = time.time()
    log.info("lease %s", json.dumps({"nonce": lease.nonce, "kind": lease.kind, **times}))
    return reply


def _hand_in(uploads: BlobSink, nonce: str, reply: RecordDict) -> None:
    """The reply to the coordinator's service too (coordinator/run/reply_spool.py): its run
    loop has it a second or so before Flower's way back brings the same bytes."""
    data = content_to_bytes(reply)
    if len(data) > MAX_REPLY_BYTES:
        return  # (a task lease's answers, say): Flower carries it alone
    try:
        uploads.submit_reply(nonce, data)
    except BlobError as err:
        log.info("reply handed to Flower only: %s", err)


def _compiling_beside(fetch: Callable[[], _T], lease: Any, spec: ModelSpec,
                      settings: WorkerSettings) -> _T:
    """``fetch()`` (the lease's downloads), on a thread while this one compiles the train
    lease's model (``ModelCache.warm``) when the worker would compile it on this lease: its
    first lease of a model then pays max(download, compile), not their sum. The compile
    stays on the thread that trains: on an H200 a compile on a thread beside the lease's
    made the first update 1.7 s slower (gpt2: 32.1 against 30.4 s), not the 2.75 s of
    download faster (``bench/first_lease.py``). A failed warm-up is logged: the lease then
    builds its model itself; a failed download is raised once the compile is done."""
    cache = settings.model_cache
    device = pick_device(settings.device)
    if (lease.kind != Kind.TRAIN or cache is None or settings.gpus > 1
            or not cache.compiles(device) or cache.holds(spec, device, settings.checkpointing)):
        return fetch()
    got: list[_T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            got.append(fetch())
        except BaseException as err:  # noqa: BLE001 - raised on the lease's thread below
            failed.append(err)

    thread = threading.Thread(target=run, daemon=True, name="lease downloads")
    thread.start()
    try:
        set_threads(settings.threads or None)  # as the lease will train: guarded state
        if settings.gate is not None:  # the cap holds for the warm-up's allocations too
            cap_memory(device, settings.gate.policy.max_gpu_memory)
        if cache.warm(spec, device, batch_size=lease.batch_size, seq_len=lease.seq_len,
                      checkpointing=settings.checkpointing):
            log.info("compiled the model for lease %s while its blobs arrived", lease.nonce)
    except Exception as err:  # noqa: BLE001 - the lease builds its model itself then
        log.warning("could not compile the model ahead of the lease: %s", err)
    finally:
        thread.join()
    if failed:
        raise failed[0]
    return got[0]


def _play_slower(slowdown: float, t0: float) -> None:
    """Wait so that the work begun at ``t0`` takes ``slowdown`` times as long."""
    if slowdown > 1.0:
        time.sleep((slowdown - 1.0) * (time.perf_counter() - t0))


def _compute(work: Work, cfg: ModelSpec, model: dict[str, np.ndarray], data: Any,
             settings: WorkerSettings,
             progress: Callable[[str, int, int, int], Progress] | None,
             ) -> tuple[dict[str, np.ndarray], UpdateMetrics]:
    """Train or evaluate ``cfg`` (the lease's arch, parsed by ``check_work``) on ``data`` (the
    shard's tokens; a tasks lease's bundle and tokenizer blobs): the reply's arrays (encoded
    as the run says) and metrics."""
    lease = work.lease
    set_threads(settings.threads or None)
    device = pick_device(settings.device)
    if settings.gate is not None:
        cap_memory(device, settings.gate.policy.max_gpu_memory)
    report = (progress(lease.kind, lease.round, lease.shard_id, lease.inner_steps)
              if progress else None)
    t0 = time.perf_counter()
    if lease.kind == Kind.TASKS:
        arrays, tokens = run_task_lease(model, work.arch, *data, device=device,
                                        batch_size=lease.batch_size)
        _play_slower(settings.slowdown, t0)
        loss = -float(sum(a[:, 0].sum() for a in arrays.values())) / tokens
        metrics = UpdateMetrics(tokens=tokens, steps=0, loss_before=loss, loss_after=loss,
                                wall_s=time.perf_counter() - t0)
    elif lease.kind == Kind.TRAIN:
        res = _train(model, cfg, data, lease, settings, device, _gated(report, settings.gate))
        feedback = settings.feedback if settings.feedback is not None else ErrorFeedback()
        arrays = feedback.encode(res.pseudo_grad, work.compression)
        node_metrics.STEP_SECONDS.observe((time.perf_counter() - t0) / max(res.steps, 1))
        _play_slower(settings.slowdown, t0)
        metrics = UpdateMetrics(tokens=res.tokens, steps=res.steps, loss_before=res.loss_before,
                                loss_after=res.loss_after, wall_s=time.perf_counter() - t0)
    else:
        # in the model the train leases keep (not with --gpus N: the ranks keep theirs)
        ev = evaluate(model, cfg, data, seq_len=lease.seq_len, batch_size=lease.batch_size,
                      device=device, models=settings.model_cache if settings.gpus <= 1 else None,
                      checkpointing=settings.checkpointing)
        arrays = {EVAL_WINDOWS: ev.window_loss}  # the signed commitment, window by window
        _play_slower(settings.slowdown, t0)
        metrics = UpdateMetrics(tokens=ev.tokens, steps=0, loss_before=ev.mean_loss,
                                loss_after=ev.mean_loss, wall_s=time.perf_counter() - t0)
    if report is not None:
        report(metrics.steps, metrics.steps, metrics.tokens, done=True)
    _record(lease.kind, metrics, device)
    return arrays, metrics


def _train(model: dict[str, np.ndarray], cfg: Any, tokens: np.ndarray, lease: Any,
           settings: WorkerSettings, device: Any, progress: Progress | None) -> Any:
    """The inner loop of a train lease: on ``device``, or data-parallel over the GPUs."""
    kw = dict(steps=lease.inner_steps, batch_size=lease.batch_size, seq_len=lease.seq_len,
              lr=lease.lr, weight_decay=lease.weight_decay, seed=lease.seed, progress=progress,
              checkpointing=settings.checkpointing)
    if settings.gpus <= 1:
        return train_inner(model, cfg, tokens, device=device, models=settings.model_cache, **kw)
    if settings.pool is not None:
        return settings.pool.run(model, cfg, tokens, **kw)
    return train_inner_parallel(settings.gpus, model, cfg, tokens, device=device.type, **kw)


def _gated(report: Progress | None, gate: LeaseGate | None) -> Progress | None:
    """``report`` with the gate checked after every step but the last (``Paused`` stops
    the lease there; finished work is never handed back)."""
    if gate is None:
        return report

    def step_done(step: int, steps: int, tokens: int) -> None:
        if report is not None:
            report(step, steps, tokens)
        if step < steps:
            gate.check(working=True)

    return step_done


def _record(kind: str, m: UpdateMetrics, device: Any) -> None:
    """The lease's work in the node's Prometheus metrics (``node.metrics``)."""
    node_metrics.LEASES.labels(kind).inc()
    node_metrics.TOKENS.labels(kind).inc(m.tokens)
    node_metrics.BUSY_SECONDS.labels(kind).inc(m.wall_s)
    if kind == Kind.TRAIN and m.wall_s > 0:
        node_metrics.TOKENS_PER_SECOND.set(m.tokens / m.wall_s)
    peak = 0
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated(device)
    node_metrics.DEVICE_MEMORY.set(peak)


def _rebuild(work: Work, held: dict[str, np.ndarray], fetch: Callable[[str, str], memoryview]
             ) -> dict[str, np.ndarray] | None:
    """The lease's base rebuilt from the version this worker holds and the change blob the
    work names; None (fetch it whole) if that fails or the result is not the base."""
    try:
        change = arrays_from_bytes(fetch("model delta", work.delta[1]))  # type: ignore[index]
        arrays = apply_delta(held, change, work.compression.block)
    except (BlobError, ProtocolError) as err:
        log.warning("could not rebuild the base from its change (%s); fetching it whole", err)
        return None
    if digest_arrays(arrays) != work.lease.base_digest:
        log.warning("the base rebuilt from its change does not match its digest; fetching "
                    "it whole")
        return None
    return arrays


def _from_seed(work: Work, spec: ModelSpec, cache: BlobDir) -> dict[str, np.ndarray] | None:
    """Version 0 built from the seed it was initialised from, as the coordinator built it
    (``init_arrays`` on CPU), and kept in the cache like a fetched blob; None (fetch it) if
    it is not the base (another torch may initialise otherwise) or cannot be kept."""
    t0, lease = time.perf_counter(), work.lease
    arrays = init_arrays(spec, int(work.init_seed))  # type: ignore[arg-type]
    data = arrays_to_bytes(arrays)
    if digest_bytes(data) != lease.base_digest:
        log.warning("the base built from seed %s does not match its digest; fetching it",
                    work.init_seed)
        return None
    try:
        cache.put(data, lease.base_digest)
    except BlobError as err:  # (a full disk): the arrays are right, only not kept
        log.warning("the base built from its seed was not cached: %s", err)
    log.info("built model %s from seed %s (%.2f s)", lease.base_digest, work.init_seed,
             time.perf_counter() - t0)
    return arrays


def _prefetch(blobs: BlobFetcher, digests: tuple[str, ...]) -> None:
    """Put ``digests`` into the cache; a failure here is retried when a lease needs it."""
    for digest in digests:
        try:
            blobs.get(digest)
        except (AtomError, OSError):
            continue

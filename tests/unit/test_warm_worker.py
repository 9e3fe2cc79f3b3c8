"""The warm worker: many leases in one process, the FAB policy before anything runs, a lease
that fails costs that lease only, and a base kept in memory is used only for its own digest."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.supercore.task_identity import TaskIdentity

from coordinator.services.superlink import app_pyproject
from node.blobs import BlobFetcher
from node.warm_worker import serve
from node.worker import BaseModels, WorkerSettings, do_work
from protocol.blobstore import BlobDir
from protocol.compression import apply_delta, encode_delta
from protocol.digest import arrays_to_bytes, digest_arrays
from protocol.errors import BlobError
from protocol.messages import Lease, content_to_bytes, parse_reply, parse_work, work_content
from protocol.signing import generate_key
from training.inner import train_inner
from training.model import GPTConfig
from training.model_cache import ModelCache
from training.state import init_arrays

GOOD_FAB = build_fab_from_files({"pyproject.toml": app_pyproject()})[0]
EVIL_FAB = build_fab_from_files({"pyproject.toml": app_pyproject(),
                                 "node/client_app.py": b"raise SystemExit"})[0]
CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)


@dataclasses.dataclass
class FakeInput:
    message: Message
    context: Context
    fab: bytes


class FakeTask:
    def __init__(self, n: int, fab: bytes = GOOD_FAB, pull_fails: bool = False,
                 finish_fails: bool = False) -> None:
        self.n, self.fab, self.pull_fails, self.finish_fails = n, fab, pull_fails, finish_fails
        self.reply: Message | None = None
        self.failed: str | None = None
        self.abandoned = False

    def pull(self) -> FakeInput:
        if self.pull_fails:
            raise httpx.ConnectError("the SuperNode went away")
        # what pulling a real task sets
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
        msg = Message(RecordDict(), dst_node_id=1, message_type="train.shard")
        return FakeInput(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                      run_config={}), self.fab)

    def finish(self, reply: Message, *, failed: str | None = None) -> None:
        if self.finish_fails:
            raise httpx.ReadTimeout("the SuperNode did not answer")
        self.reply, self.failed = reply, failed

    def abandon(self) -> None:
        self.abandoned = True


class FakeTasks:
    """A SuperNode queue: hands out ``tasks`` (an exception in the list is raised), then
    stops the worker once it has polled an empty queue."""

    def __init__(self, tasks: list[Any], stop: threading.Event) -> None:
        self.tasks, self.stop = list(tasks), stop

    def acquire(self) -> FakeTask | None:
        if not self.tasks:
            self.stop.set()
            return None
        item = self.tasks.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def run(tasks: list[Any], handle: Any) -> int:
    stop = threading.Event()
    return serve(FakeTasks(tasks, stop), handle, stop, poll_s=0.0)  # type: ignore[arg-type]


def test_one_process_answers_every_lease_and_keeps_its_state() -> None:
    seen: list[int] = []
    state = {"calls": 0}  # what a warm worker keeps: module state, torch, the session

    def handle(msg: Message, ctx: Context) -> Message:
        state["calls"] += 1
        seen.append(threading.get_native_id())
        return Message(RecordDict(), reply_to=msg)

    tasks = [FakeTask(i) for i in range(5)]
    assert run(tasks, handle) == 5
    assert state["calls"] == 5 and len(set(seen)) == 1
    assert all(t.reply is not None and not t.reply.has_error() and t.failed is None
               for t in tasks)


def test_a_fab_with_code_is_refused_before_the_clientapp_runs() -> None:
    calls: list[int] = []

    def handle(msg: Message, ctx: Context) -> Message:
        calls.append(1)
        return Message(RecordDict(), reply_to=msg)

    evil, good = FakeTask(0, EVIL_FAB), FakeTask(1)
    run([evil, good], handle)
    assert evil.reply is not None and evil.reply.has_error()
    assert "FAB rejected by node policy" in evil.reply.error.reason
    assert calls == [1]  # only the good task reached the ClientApp
    assert good.reply is not None and not good.reply.has_error()


def test_a_failing_lease_costs_only_itself() -> None:
    def handle(msg: Message, ctx: Context) -> Message:
        if not hasattr(handle, "failed"):
            handle.failed = True  # type: ignore[attr-defined]
            raise RuntimeError("CUDA out of memory")
        return Message(RecordDict(), reply_to=msg)

    first, lost, second = FakeTask(0), FakeTask(1, pull_fails=True), FakeTask(2)
    unsent = FakeTask(3, finish_fails=True)
    down = httpx.ConnectError("SuperNode restarting")
    assert run([first, down, lost, unsent, second], handle) == 4
    assert unsent.abandoned and unsent.reply is None
    assert first.reply is not None and first.reply.has_error()
    assert "CUDA out of memory" in first.reply.error.reason and first.failed
    assert lost.abandoned and lost.reply is None  # Flower answers it when the claim lapses
    assert second.reply is not None and not second.reply.has_error()


# -- the session's memory: the base of the last leases -------------------------------------

def lease_on(blobs: BlobDir, model: dict[str, np.ndarray], tokens: np.ndarray,
             nonce: str, kind: str = "train", deadline_s: float = 60.0) -> RecordDict:
    lease = Lease(run_id="r", round=1, shard_id=0, kind=kind, base_version=0,
                  base_digest=blobs.put(arrays_to_bytes(model)), data_start=0,
                  data_end=len(tokens), data_digest=blobs.put(tokens.tobytes()),
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  inner_steps=2 if kind == "train" else 0, batch_size=2, seq_len=8, lr=1e-3,
                  weight_decay=0.0, seed=1, deadline=time.time() + deadline_s, nonce=nonce)
    return work_content(lease, dataclasses.asdict(CFG))


class CountingFetcher(BlobFetcher):
    reads: list[str] = []
    delay_s = 0.0  # a blob that takes its time to arrive

    def get(self, digest: str, progress: Any = None) -> bytes:
        CountingFetcher.reads.append(digest)
        time.sleep(CountingFetcher.delay_s)
        return super().get(digest, progress)


@dataclasses.dataclass(frozen=True)
class CountingSettings(WorkerSettings):
    def fetcher(self, mirrors: list[str]) -> BlobFetcher:
        assert self.cache is not None
        return CountingFetcher(self.cache, [], self.limits.max_work_bytes)


def test_a_lease_logs_how_long_its_blobs_took_apart_from_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/throughput.py splits the time before the first step into fetch and decode
    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    monkeypatch.setattr(CountingFetcher, "delay_s", 0.2)
    settings = CountingSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs)
    with caplog.at_level("INFO", logger="node.worker"):
        do_work(lease_on(blobs, init_arrays(CFG, seed=0), tokens, "1" * 32), settings)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lease {")]
    t = json.loads(line[len("lease "):])
    assert t["nonce"] == "1" * 32
    assert 0.4 <= t["fetch_s"] <= t["work_start"] - t["received"]  # the model and the shard


def test_the_base_is_read_once_and_never_used_for_another_digest(tmp_path: Path) -> None:
    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    a, b = init_arrays(CFG, seed=0), init_arrays(CFG, seed=1)
    settings = CountingSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                                models=BaseModels())
    CountingFetcher.reads = []
    first = parse_reply(do_work(lease_on(blobs, a, tokens, "1" * 32), settings))[0]
    again = parse_reply(do_work(lease_on(blobs, a, tokens, "2" * 32), settings))[0]
    other = parse_reply(do_work(lease_on(blobs, b, tokens, "3" * 32), settings))[0]
    digest_a, digest_b = (parse_work(lease_on(blobs, m, tokens, "4" * 32)).lease.base_digest
                          for m in (a, b))
    assert CountingFetcher.reads.count(digest_a) == 1  # the second lease on A: from memory
    assert CountingFetcher.reads.count(digest_b) == 1
    assert settings.models is not None and settings.models.hits == 1
    assert again.metrics.loss_before == first.metrics.loss_before
    # B's lease trained from B, not from the A in memory: what a fresh process computes
    want = train_inner(b, CFG, tokens, steps=2, batch_size=2, seq_len=8, lr=1e-3,
                       weight_decay=0.0, seed=1, device="cpu")
    assert other.metrics.loss_before == pytest.approx(want.loss_before)
    assert other.metrics.loss_before != first.metrics.loss_before


class StoreSource:
    """A blob source over another store (the coordinator's), counting what it serves."""

    name = "coordinator"

    def __init__(self, store: BlobDir) -> None:
        self.store, self.served = store, []  # type: list[str]

    def fetch(self, digest: str, into: Any, max_bytes: int, progress: Any) -> None:
        self.served.append(digest)
        into.append(bytes(self.store.view(digest)))


def test_version_0_is_built_from_its_seed_and_fetched_only_if_that_is_not_it(
        tmp_path: Path) -> None:
    coordinator, cache = BlobDir(tmp_path / "coordinator"), BlobDir(tmp_path / "cache")
    tokens = (np.arange(64) % 256).astype("<u2")
    v0 = init_arrays(CFG, seed=7)  # the run's version 0
    lease = parse_work(lease_on(coordinator, v0, tokens, "1" * 32)).lease
    source = StoreSource(coordinator)

    @dataclasses.dataclass(frozen=True)
    class Settings(WorkerSettings):
        def fetcher(self, mirrors: list[str]) -> BlobFetcher:
            assert self.cache is not None
            return BlobFetcher(self.cache, [source], self.limits.max_work_bytes)

    settings = Settings(node_id=1, key=generate_key(), device="cpu", cache=cache)
    got = parse_reply(do_work(work_content(lease, dataclasses.asdict(CFG), init_seed=7),
                              settings))[0]
    assert source.served == [lease.data_digest] and cache.has(lease.base_digest)
    want = train_inner(v0, CFG, tokens, steps=2, batch_size=2, seq_len=8, lr=1e-3,
                       weight_decay=0.0, seed=1, device="cpu")
    assert got.metrics.loss_before == pytest.approx(want.loss_before)
    # a seed that does not make the base (another torch, a lying coordinator): fetched whole
    cache.path(lease.base_digest).unlink()
    other = dataclasses.replace(lease, nonce="2" * 32)
    got = parse_reply(do_work(work_content(other, dataclasses.asdict(CFG), init_seed=8),
                              settings))[0]
    assert source.served == [lease.data_digest, lease.base_digest]
    assert got.metrics.loss_before == pytest.approx(want.loss_before)


def test_base_models_keep_the_most_recent_and_read_only() -> None:
    models = BaseModels(keep=2)
    loads: list[str] = []

    def load(name: str):  # type: ignore[no-untyped-def]
        return lambda: loads.append(name) or {"w": np.zeros(3, np.float32)}

    for name in ("a", "b", "a", "c", "b"):
        arrays = models.get(name, load(name))
    assert loads == ["a", "b", "c", "b"]  # "a" was a hit; "b" fell out when "c" came
    with pytest.raises(ValueError):
        arrays["w"][0] = 1.0  # shared by every lease on the version: nobody writes to it


def test_a_new_version_is_rebuilt_from_the_one_held_and_its_change(tmp_path: Path) -> None:
    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    a = init_arrays(CFG, seed=0)
    step = {k: (v * 0.01).astype(np.float32) for k, v in init_arrays(CFG, seed=1).items()}
    change = encode_delta(a, {k: a[k] + step[k] for k in a}, 256)
    b = apply_delta(a, change, 256)  # the version the coordinator makes
    settings = CountingSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                                models=BaseModels())
    parse_reply(do_work(lease_on(blobs, a, tokens, "1" * 32), settings))  # holds A now
    change_digest = blobs.put(arrays_to_bytes(change))

    def on_b(nonce: str, delta_blob: str) -> RecordDict:
        work = parse_work(lease_on(blobs, b, tokens, nonce))
        return work_content(work.lease, dataclasses.asdict(CFG),
                            delta=(digest_arrays(a), delta_blob))

    content = on_b("2" * 32, change_digest)
    b_digest = parse_work(content).lease.base_digest
    blobs.path(b_digest).unlink()  # only the change is there to fetch
    CountingFetcher.reads = []
    got = parse_reply(do_work(content, settings))[0]
    assert CountingFetcher.reads[0] == change_digest and b_digest not in CountingFetcher.reads
    want = train_inner(b, CFG, tokens, steps=2, batch_size=2, seq_len=8, lr=1e-3,
                       weight_decay=0.0, seed=1, device="cpu")
    assert got.metrics.loss_before == pytest.approx(want.loss_before)

    # a change that does not rebuild the lease's base is not used: the base comes whole
    settings = CountingSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                                models=BaseModels())
    parse_reply(do_work(lease_on(blobs, a, tokens, "3" * 32), settings))
    wrong = blobs.put(arrays_to_bytes(encode_delta(a, {k: a[k] - step[k] for k in a}, 256)))
    CountingFetcher.reads = []
    got = parse_reply(do_work(on_b("4" * 32, wrong), settings))[0]
    assert CountingFetcher.reads[:2] == [wrong, b_digest]
    assert got.metrics.loss_before == pytest.approx(want.loss_before)


def test_train_leases_reuse_the_sessions_model(tmp_path: Path) -> None:
    # the worker hands its ModelCache to the inner loop and to evaluation: the model is
    # built on the first lease only, and every lease still replies what a fresh process
    # computes
    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    a, b = init_arrays(CFG, seed=0), init_arrays(CFG, seed=1)
    settings = WorkerSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                              model_cache=ModelCache())
    fresh = dataclasses.replace(settings, model_cache=None)
    # an eval lease in between scores in the same model (no second copy of the weights)
    # and leaves nothing behind for the next train lease
    for base, nonce, kind in ((a, "1" * 32, "train"), (b, "3" * 32, "eval"),
                              (b, "2" * 32, "train")):
        got = parse_reply(do_work(lease_on(blobs, base, tokens, nonce, kind), settings))
        want = parse_reply(do_work(lease_on(blobs, base, tokens, nonce, kind), fresh))
        assert got[0].metrics.loss_after == want[0].metrics.loss_after
        assert got[1].keys() == want[1].keys()
        assert all(np.array_equal(got[1][k], want[1][k]) for k in want[1])
    assert settings.model_cache is not None
    assert (settings.model_cache.builds, settings.model_cache.reuses) == (1, 2)


class SlowFetcher(BlobFetcher):
    """Blobs that arrive only once the compile has begun: a lease that compiled after its
    downloads instead of beside them would wait here, and be caught."""

    warming = threading.Event()
    threads: list[str] = []

    def get(self, digest: str, progress: Any = None) -> bytes:
        SlowFetcher.threads.append(threading.current_thread().name)
        assert SlowFetcher.warming.wait(10), "the model was not compiled beside the downloads"
        return super().get(digest, progress)


@dataclasses.dataclass(frozen=True)
class SlowSettings(WorkerSettings):
    def fetcher(self, mirrors: list[str]) -> BlobFetcher:
        assert self.cache is not None
        return SlowFetcher(self.cache, [], self.limits.max_work_bytes)


class WatchedCache(ModelCache):
    def __init__(self) -> None:
        super().__init__(use_compile=True, backend=lambda gm, example_inputs: gm.forward)
        self.warmed: list[tuple[str, int, int]] = []

    def warm(self, cfg: Any, device: Any, *, batch_size: int, seq_len: int,
             checkpointing: bool = False) -> bool:
        self.warmed.append((threading.current_thread().name, batch_size, seq_len))
        SlowFetcher.warming.set()
        return super().warm(cfg, device, batch_size=batch_size, seq_len=seq_len,
                            checkpointing=checkpointing)


def test_the_first_lease_compiles_its_model_while_its_blobs_arrive(tmp_path: Path) -> None:
    import torch

    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    base = init_arrays(CFG, seed=0)
    cache = WatchedCache()
    settings = SlowSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                            model_cache=cache)
    SlowFetcher.warming.clear()
    SlowFetcher.threads = []
    try:
        got = parse_reply(do_work(lease_on(blobs, base, tokens, "1" * 32), settings))
        # compiled on the thread that trains, for the lease's batch; fetched on another
        assert cache.warmed == [(threading.current_thread().name, 2, 8)]
        assert SlowFetcher.threads == ["lease downloads"] * 2  # the base and the shard
        assert (cache.builds, cache.reuses) == (1, 1)  # the lease refilled the warmed model
        parse_reply(do_work(lease_on(blobs, base, tokens, "2" * 32, "eval"), settings))
        parse_reply(do_work(lease_on(blobs, base, tokens, "3" * 32), settings))
        assert len(cache.warmed) == 1 and cache.builds == 1  # held: nothing more to warm
        # the eval lease and the next train lease: nothing to compile, fetched in line
        assert SlowFetcher.threads[2:] == [threading.current_thread().name] * 4
    finally:
        torch._dynamo.reset()
    want = parse_reply(do_work(lease_on(blobs, base, tokens, "1" * 32),
                               WorkerSettings(node_id=1, key=generate_key(), device="cpu",
                                              cache=blobs)))
    assert got[0].metrics.loss_before == want[0].metrics.loss_before
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=0, atol=1e-6)


class HandIns:
    """The coordinator's upload service, as the worker sees it."""

    def __init__(self, blobs: BlobDir, refuse: bool = False) -> None:
        self.blobs, self.refuse = blobs, refuse
        self.replies: dict[str, bytes] = {}

    def put(self, digest: str, data: bytes, lease_nonce: str, progress: Any = None) -> None:
        self.blobs.put(data, digest)

    def submit_reply(self, lease_nonce: str, reply: bytes) -> None:
        if self.refuse:
            raise BlobError("coordinator refused the reply: PERMISSION_DENIED: no open lease")
        self.replies[lease_nonce] = reply


@pytest.mark.parametrize("refuse", [False, True])
def test_every_reply_is_also_handed_to_the_coordinator_s_service(tmp_path: Path,
                                                                 refuse: bool) -> None:
    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    model = init_arrays(CFG, seed=0)
    uploads = HandIns(blobs, refuse)
    settings = WorkerSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                              uploads=uploads)
    for nonce, kind in (("1" * 32, "train"), ("2" * 32, "eval")):
        reply = do_work(lease_on(blobs, model, tokens, nonce, kind), settings)
        parse_reply(reply)  # a refused hand-in changes nothing of the reply Flower takes
        if not refuse:  # the very bytes Flower carries
            assert uploads.replies[nonce] == content_to_bytes(reply)
    assert len(uploads.replies) == (0 if refuse else 2)


class ClosedLeases(HandIns):
    """An upload service whose leases are all closed (as the coordinator's, once a lease's
    deadline has passed and the loop expired it)."""

    def put(self, digest: str, data: bytes, lease_nonce: str, progress: Any = None) -> None:
        raise BlobError(f"coordinator refused the update payload {digest[:12]}: "
                        "PERMISSION_DENIED: forbidden: no open train lease with that nonce")


def test_an_upload_refused_after_the_deadline_says_the_lease_expired(tmp_path: Path) -> None:
    blobs = BlobDir(tmp_path / "blobs")
    tokens = (np.arange(64) % 256).astype("<u2")
    model = init_arrays(CFG, seed=0)
    settings = WorkerSettings(node_id=1, key=generate_key(), device="cpu", cache=blobs,
                              uploads=ClosedLeases(blobs))
    with pytest.raises(BlobError, match=r"^lease 11111111 ran \d+ s past its deadline .*"
                                        r"took no update, so this lease's work is lost"):
        do_work(lease_on(blobs, model, tokens, "1" * 32, deadline_s=-5), settings)
    # before its deadline, a refusal is what the coordinator said (a revoked node, a bad nonce)
    with pytest.raises(BlobError, match="no open train lease with that nonce"):
        do_work(lease_on(blobs, model, tokens, "2" * 32), settings)


def test_the_worker_pulls_a_task_s_objects_as_they_land(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    # the worker claims a task while the SuperNode still pulls its objects: with Flower's
    # 1 s first backoff its own pull of them took 0.7-1.0 s (protocol/flower_pulls.py)
    from flwr.supercore.inflatable import inflatable_utils as iu

    import node.warm_worker as ww

    from node.flower_runtime import TASK_PULL_MAX_S

    tree_pull = iu.pull_and_inflate_object_from_tree
    monkeypatch.setitem(tree_pull.__kwdefaults__, "initial_backoff", 1.0)
    monkeypatch.setitem(tree_pull.__kwdefaults__, "max_time", 7200)
    monkeypatch.setitem(iu.pull_objects.__kwdefaults__, "initial_backoff", 1.0)
    monkeypatch.setattr(ww, "leave_on_signals", lambda stop: None)
    monkeypatch.setattr(ww, "RuntimeTasks", lambda *a: types.SimpleNamespace(close=lambda: None))
    served = []
    monkeypatch.setattr(ww, "serve", lambda *a, **kw: served.append(
        (tree_pull.__kwdefaults__["initial_backoff"], tree_pull.__kwdefaults__["max_time"]))
        or 0)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    assert ww.main(["--runtime-api", "127.0.0.1:1", "--secret-file", str(secret)]) == 0
    # ...and gives up a task whose objects never come (one Flower left unfinished)
    assert served == [(0.05, TASK_PULL_MAX_S)]

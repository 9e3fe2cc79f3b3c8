"""Leases taken beside Flower (``node.work_ahead``): the warm worker runs the next lease as soon
as the coordinator issues it, answers Flower's copy with the same reply without running it
again, never runs a lease twice whichever way came first, and asks at the coordinator's pace."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from node.warm_worker import serve
from node.work_ahead import WorkAhead
from protocol.messages import Lease, content_to_bytes, work_content

from test_warm_worker import GOOD_FAB, FakeInput, FakeTask  # noqa: E402 (rootdir on sys.path)

X, Y, Z = "1" * 32, "2" * 32, "3" * 32


def work(nonce: str) -> RecordDict:
    lease = Lease(run_id="r", round=1, shard_id=0, kind="train", base_version=0,
                  base_digest="a" * 64, data_start=0, data_end=100, data_digest="b" * 64,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64, inner_steps=2,
                  batch_size=2, seq_len=8, lr=1e-3, weight_decay=0.0, seed=1,
                  deadline=time.time() + 60, nonce=nonce)
    return work_content(lease, {"n_layer": 1})


def answer(nonce: str, via: str) -> RecordDict:
    return RecordDict({"update": ConfigRecord({"nonce": nonce, "via": via})})


def nonce_of(content: RecordDict) -> str:
    return str(content["work"]["lease.nonce"])  # type: ignore[index]


class Task(FakeTask):
    """A Flower task carrying ``content``."""

    def __init__(self, content: RecordDict) -> None:
        super().__init__(0)
        self.content = content

    def pull(self) -> FakeInput:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
        msg = Message(self.content, dst_node_id=1, message_type="train.shard")
        return FakeInput(msg, Context(run_id=1, node_id=1, node_config={"home": "h"},
                                      state=RecordDict(), run_config={}), GOOD_FAB)


class Script:
    """The SuperNode's queue, one step per poll: a Task, or None for an empty queue; the
    worker is stopped once the script is done."""

    def __init__(self, steps: list[Any], stop: threading.Event) -> None:
        self.steps, self.stop = list(steps), stop

    def acquire(self) -> Task | None:
        if not self.steps:
            self.stop.set()
            return None
        return self.steps.pop(0)


class Coordinator:
    """``NextWork``: the work issued after each nonce (as the loop's spool holds it)."""

    def __init__(self, after: dict[str, RecordDict], retry_s: float = 0.0) -> None:
        self.after, self.retry_s = after, retry_s
        self.asked: list[str] = []

    def __call__(self, after_nonce: str, context: Context) -> tuple[bytes, float]:
        self.asked.append(after_nonce)
        got = self.after.get(after_nonce)
        return (content_to_bytes(got) if got is not None else b""), self.retry_s


def worker(steps: list[Any], coordinator: Any, fail: set[str] = frozenset()
           ) -> tuple[list[tuple[str, str]], WorkAhead]:
    ran: list[tuple[str, str]] = []  # (nonce, how)

    def handle(msg: Message, ctx: Context) -> Message:
        ran.append((nonce_of(msg.content), "flower"))
        return Message(answer(nonce_of(msg.content), "flower"), reply_to=msg)

    def run(content: RecordDict, ctx: Context) -> RecordDict:
        assert ctx.node_config == {"home": "h"}  # the session of the last Flower task
        ran.append((nonce_of(content), "ahead"))
        if nonce_of(content) in fail:
            raise RuntimeError("CUDA out of memory")
        return answer(nonce_of(content), "ahead")

    ahead = WorkAhead(coordinator, run)
    stop = threading.Event()
    serve(Script(steps, stop), handle, stop, poll_s=0.0, ahead=ahead)  # type: ignore[arg-type]
    return ran, ahead


def test_the_next_lease_runs_beside_flower_and_flower_s_copy_gets_the_same_answer() -> None:
    tx, ty, tz = Task(work(X)), Task(work(Y)), Task(work(Z))
    coord = Coordinator({X: work(Y), Y: work(Z)})
    # X by Flower; the queue is empty, so Y and then Z are taken beside it; Flower's copies
    # of Y and Z come later and are answered with the replies already made
    ran, _ = worker([tx, None, None, ty, tz], coord)
    assert ran == [(X, "flower"), (Y, "ahead"), (Z, "ahead")]
    for task, nonce in ((ty, Y), (tz, Z)):
        assert task.reply is not None and not task.reply.has_error() and task.failed is None
        assert task.reply.content == answer(nonce, "ahead")
    assert coord.asked[:2] == [X, Y]


def test_nothing_is_asked_before_flower_started_a_run_here() -> None:
    coord = Coordinator({X: work(Y)})
    ran, _ = worker([None, None, Task(work(X))], coord)  # (two empty polls first)
    assert ran == [(X, "flower"), (Y, "ahead")] and coord.asked == [X, Y]


def test_a_lease_flower_brought_first_is_not_run_again_and_the_chain_goes_past_it() -> None:
    coord = Coordinator({X: work(Y), Y: work(Z)})
    ahead = WorkAhead(coord, lambda c, ctx: answer(nonce_of(c), "ahead"))
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    ahead.starting(X, ctx)
    ahead.finished(X)
    ahead.starting(Y, ctx)  # Flower's Y claimed before the worker asked after X
    assert ahead.take() is None and coord.asked == [X]  # Y: not run twice
    assert ahead.after == Y
    got = ahead.take()  # and at once the work after Y
    assert got is not None and nonce_of(got) == Z and coord.asked == [X, Y]


def test_the_coordinator_is_asked_before_flower_s_queue() -> None:
    # Flower's copy of Y is queued, but the worker takes Y and Z beside it first (a claimed
    # task blocks until its objects are in the SuperNode); the copies get the replies
    ty, tz = Task(work(Y)), Task(work(Z))
    ran, _ = worker([Task(work(X)), ty, tz], Coordinator({X: work(Y), Y: work(Z)}))
    assert ran == [(X, "flower"), (Y, "ahead"), (Z, "ahead")]
    assert ty.reply is not None and ty.reply.content == answer(Y, "ahead")
    assert tz.reply is not None and tz.reply.content == answer(Z, "ahead")


def test_a_lease_that_failed_beside_flower_fails_its_flower_copy() -> None:
    ty = Task(work(Y))
    ran, _ = worker([Task(work(X)), None, ty], Coordinator({X: work(Y)}), fail={Y})
    assert ran == [(X, "flower"), (Y, "ahead")]  # once, not again on Flower's copy
    assert ty.reply is not None and ty.reply.has_error()
    assert "CUDA out of memory" in ty.reply.error.reason and ty.failed


def test_the_worker_asks_at_the_coordinator_s_pace_and_stops_if_refused() -> None:
    now = [0.0]
    coord = Coordinator({}, retry_s=1.0)
    ahead = WorkAhead(coord, lambda c, ctx: answer("", ""), clock=lambda: now[0])
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    ahead.starting(X, ctx)
    ahead.finished(X)
    assert ahead.take() is None and ahead.take() is None and coord.asked == [X]
    now[0] = 1.0
    assert ahead.take() is None and coord.asked == [X, X]

    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNIMPLEMENTED  # an older coordinator

        def details(self) -> str:
            return "Method not found!"

    def refuse(nonce: str, context: Context) -> tuple[bytes, float]:
        raise Refused()

    ahead._ask = refuse  # type: ignore[assignment]
    now[0] = 2.0
    assert ahead.take() is None and ahead.off
    ahead._ask = coord  # (it is not asked again)
    now[0] = 10.0
    assert ahead.take() is None and coord.asked == [X, X]


def test_unreadable_next_work_is_left_to_flower() -> None:
    ahead = WorkAhead(lambda n, ctx: (b"\xff\x00 garbage", 0.0), lambda c, ctx: c)
    ahead.starting(X, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                              run_config={}))
    ahead.finished(X)
    assert ahead.take() is None and ahead.after is None

"""The warm worker: one long-lived process that runs every lease the node's SuperNode receives.

The join supervisor starts the SuperNode with ``--isolation process`` (so it starts no
``flwr-clientapp`` processes of its own) and this worker beside it, on the SuperNode's
Runtime API. The worker claims each task, checks the run's FAB against the node policy
(``node.fab_guard.check_fab``; it is never unpacked, so nothing in it can be imported), and
hands the message to the installed ClientApp, ``node.client_app.app``, in this process:
torch stays imported and ``NodeSession`` keeps the key, the coordinator channel, the blob
cache and the last base models between leases. A lease that raises gets an error reply and
the worker carries on; a worker that dies is restarted by the supervisor, and Flower answers
the lease it held with an error once its task heartbeat lapses (about 60 s), so only that
lease is lost. When Flower has no task for it, the worker takes the node's next lease
beside Flower if the coordinator has issued it (``node.work_ahead``), and answers Flower's
copy of it, when that comes, with the same reply.

Signals (``leave_on_signals``): SIGUSR1 makes the node *leave* — the lease in flight is
handed back after its current training step and every later one at once
(``node.pause.LEAVING``), while the worker keeps answering, so the SuperNode can send every
reply before the supervisor stops it. SIGTERM and SIGINT do the same, then exit.

Run as ``python -m node.warm_worker --runtime-api 127.0.0.1:PORT --secret-file FILE`` (the
secret the SuperNode was started with: only this worker may claim the node's tasks).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode

from protocol.flower_pulls import quick_object_pulls
from protocol.messages import parse_work

from .fab_guard import check_fab
from .flower_runtime import ClientTask, RuntimeTasks, bound_task_pulls
from .pause import LEAVING
from .work_ahead import WorkAhead

__all__ = ["leave_on_signals", "main", "run_task", "serve"]

log = logging.getLogger("node.warm_worker")

Handler = Callable[[Message, Context], Message]
_POLL_S = 0.05  # loopback, one small request: idle cost is negligible, latency is not
_DOWN_S = 0.5  # the SuperNode is (re)starting


def _error_reply(message: Message, err: BaseException) -> Message:
    # Flower's own wording ("<class 'X'>:<'why'>"), so the coordinator reads it the same way
    reason = f"{type(err)}:<'{err}'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=message)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _nonce(message: Message) -> str | None:
    try:
        return parse_work(message.content).lease.nonce
    except Exception:  # noqa: BLE001 - not a lease: the handler says what is wrong with it
        return None


def run_task(task: ClientTask, handle: Handler, ahead: WorkAhead | None = None) -> bool:
    """Run one claimed task to its reply; True if the lease was answered without error.
    With ``ahead``: a lease already run beside Flower is answered with what it gave."""
    try:
        inp = task.pull()
    except Exception as err:  # noqa: BLE001 - Flower answers the lease once its claim lapses
        log.warning("could not take a task: %s", _first_line(err))
        task.abandon()
        return False
    failed: str | None = None
    nonce = _nonce(inp.message) if ahead is not None else None
    try:
        check_fab(inp.fab)  # before anything of the run's is used
        answer = ahead.answer_for(nonce) if ahead is not None else None
        if isinstance(answer, BaseException):
            raise answer
        if answer is not None:
            reply = Message(answer, reply_to=inp.message)
        else:
            if ahead is not None:
                ahead.starting(nonce, inp.context)
            try:
                reply = handle(inp.message, inp.context)
            finally:
                if ahead is not None:
                    ahead.finished(nonce)
    except Exception as err:  # noqa: BLE001 - any failure is this lease's alone
        log.warning("lease failed: %s: %s", type(err).__name__, _first_line(err))
        reply, failed = _error_reply(inp.message, err), str(err)[:300]
    try:
        task.finish(reply, failed=failed)
    except Exception as err:  # noqa: BLE001 - Flower answers the lease once its claim lapses
        log.warning("could not hand the reply back: %s", _first_line(err))
        task.abandon()
        return False
    if failed is None:
        log.info("pid %d answered %s", os.getpid(), inp.message.metadata.message_type)
    return failed is None


def serve(tasks: RuntimeTasks, handle: Handler, stop: threading.Event,
          poll_s: float = _POLL_S, ahead: WorkAhead | None = None) -> int:
    """Run tasks until ``stop`` is set; returns how many were handled (leases ``ahead``
    gave included)."""
    done = 0
    while not stop.is_set():
        # The coordinator first: a lease it has issued is there before Flower brings it, and
        # a task claimed from Flower blocks until its objects are in the SuperNode, which
        # for the trailing copy of a lease run ahead took 1.5 s on the bench
        if ahead is not None and not LEAVING.is_set() and (work := ahead.take()) is not None:
            ahead.run(work)
            done += 1
            continue
        try:
            task = tasks.acquire()
        except httpx.HTTPError:
            stop.wait(_DOWN_S)
            continue
        if task is None:
            stop.wait(poll_s)
            continue
        run_task(task, handle, ahead)
        done += 1
    return done


def leave_on_signals(stop: threading.Event, leaving: threading.Event = LEAVING) -> None:
    """SIGUSR1: leave (hand back the lease in flight after its step, and all later ones),
    answering on until stopped; SIGTERM, SIGINT: leave and exit once the lease is answered."""
    def leave(*_: object) -> None:
        leaving.set()

    def leave_and_stop(*_: object) -> None:
        leaving.set()
        stop.set()

    signal.signal(signal.SIGUSR1, leave)
    signal.signal(signal.SIGTERM, leave_and_stop)
    signal.signal(signal.SIGINT, leave_and_stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.warm_worker")
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's HOST:PORT")
    parser.add_argument("--secret-file", required=True, type=Path,
                        help="the SuperNode's --superexec-auth-secret-file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    stop = threading.Event()
    leave_on_signals(stop)  # before the slow import: SIGUSR1 would otherwise kill us
    # The installed ClientApp, and through it torch, once for the life of the process.
    from .client_app import app, next_work, run_work

    quick_object_pulls()  # a task's objects as the SuperNode stores them
    bound_task_pulls()  # and not for ever (a task Flower left unfinished)
    tasks = RuntimeTasks(args.runtime_api, args.secret_file.read_bytes())
    log.info("warm worker pid %d on %s", os.getpid(), args.runtime_api)
    try:
        serve(tasks, lambda msg, ctx: app(message=msg, context=ctx), stop,
              ahead=WorkAhead(next_work, run_work))
    finally:
        tasks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

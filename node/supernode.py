"""The node's SuperNode: Flower's own, taking its next message while the worker runs one.

Flower 1.42's SuperNode loop pulls one message, waits for its reply (looking every 0.5 s),
pushes it, and only then pulls the next. The coordinator keeps the next lease queued in the
SuperLink (the evaluation behind a train lease; ``[async] queue``), yet the node saw it only
after its reply had gone out and a pull had come back: 1.7-1.8 s a lease on the loaded
2-core bench machine, the largest part of the lease overhead (docs/performance.md).

``atom-supernode`` is ``flower-supernode`` with two steps of that loop replaced
(``install``; internal APIs: flwr is pinned and tests/unit/test_flower_runtime_contract.py
checks them): replies go out from a thread of their own as soon as the worker hands them
over, and the loop pulls the next message while fewer than ``DEPTH`` are in flight, so the
worker finds its next task waiting when it finishes one. Idle, it asks the SuperLink for work
every 3 s as Flower does, and sooner right after a reply or, when its node has just joined,
its own start (the next lease, or a joining node's first, is usually on its way then).
Everything else — TLS, node auth, the Runtime API, the object store — is Flower's,
unchanged.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from protocol.flower_pulls import quick_object_pulls

__all__ = ["DEPTH", "JUST_JOINED", "Pipeline", "install", "main"]

log = logging.getLogger("node.supernode")

DEPTH = 2  # the message being worked on and the one queued behind it
_REPLY_POLL_S = 0.05  # a local look at the SuperNode's own state: cheap, and latency counts
_IDLE_S = 3.0  # Flower's pull interval with nothing to do (10,000 idle nodes: ~3,300 req/s)
# After a reply goes out the next lease is usually on its way: the coordinator polls every
# 0.2 s, and a lock-step round closes within seconds of its last reply. Ask every 0.3 s for
# 10 s, then fall back to the idle interval. (An exponential 0.1 ... 1.6 s backoff missed
# most round closes by 1-2 s: bench/throughput.py's lock-step "wait" was 1.2-1.6 s.) A node
# that always has a lease queued ([async] queue) finds it on the first pull; a 1,000-node
# lock-step barrier costs the SuperLink ~3,300 pulls/s for its length, what 10,000 idle
# nodes cost it always. The SuperNode a node's ``join`` starts first asks the same way
# (``JUST_JOINED``): the first lease of a run, or of a running network's next round or free
# slot, usually follows within seconds, and Flower's 3 s sleep cost each node's first lease
# 1.2-4 s (bench/throughput.py); 33 pulls once per join. Not a restarted one: every
# SuperNode restarts when the SuperLink does, and 10,000 asking every 0.3 s at once would
# be ~33,000 pulls/s just as the SuperLink comes back.
_AFTER_REPLY_S = (0.1, 0.2) + (0.3,) * 33
_MODULE = "flwr.supernode.start_client_internal"
JUST_JOINED = "ATOM_SUPERNODE_JUST_JOINED"  # "1" in the environment of a join's first start


class _Stopped(Exception):
    """The pusher was stopped while it waited for a reply."""


class _ReplyWait:
    """The SuperNode's state, except that a look for replies waits for one.

    Flower's ``_push_messages`` looks every 0.5 s; this hands it the reply within
    ``poll_s`` of the worker's push, and ends the wait with ``_Stopped`` once ``stop`` is
    set (Flower's loop would look forever)."""

    def __init__(self, state: Any, stop: threading.Event,
                 poll_s: float = _REPLY_POLL_S) -> None:
        self._state, self._stop, self._poll_s = state, stop, poll_s

    def get_messages_legacy(self, **kwargs: Any) -> Any:
        if kwargs.get("is_reply") is not True:
            return self._state.get_messages_legacy(**kwargs)
        while not (found := self._state.get_messages_legacy(**kwargs)):
            if self._stop.wait(self._poll_s):
                raise _Stopped
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class Pipeline:
    """Flower's pull and push steps, run so that up to ``depth`` messages are in flight.

    ``pull(**kw)`` is Flower's ``_pull_and_store_message`` (a run id when it stored a
    message, else None) and ``push(**kw)`` its ``_push_messages`` (waits for replies, sends
    each through ``kw["send"]``). The loop that calls them is Flower's own:
    ``pull_next`` blocks until a message is stored (so the loop's idle sleep never runs) and
    ``push_started`` returns at once, the replies being sent by the pusher thread."""

    def __init__(self, pull: Callable[..., int | None], push: Callable[..., None],
                 depth: int = DEPTH, idle_s: float = _IDLE_S,
                 after_reply_s: tuple[float, ...] = _AFTER_REPLY_S,
                 just_joined: bool = False) -> None:
        self._pull, self._push, self.depth = pull, push, depth
        self._idle_s, self._after_reply_s = idle_s, after_reply_s
        self._cv = threading.Condition()
        self.in_flight = 0
        self._replies = 0  # replies sent so far
        # into after_reply_s (past its end: idle_s); a reply restarts it, and so does a join
        self._quick = 0 if just_joined else len(after_reply_s)
        self._pusher: threading.Thread | None = None
        self.stop = threading.Event()

    def pull_next(self, **kwargs: Any) -> int:
        """Pull until a message is stored, never holding more than ``depth``."""
        while True:
            with self._cv:
                while self.in_flight >= self.depth:
                    self._cv.wait(0.5)  # (a timeout: signals reach the main thread)
                replies = self._replies
            run_id = self._pull(**kwargs)
            with self._cv:
                if run_id is not None:
                    self.in_flight += 1
                    return run_id
                delay = (self._after_reply_s[self._quick]
                         if self._quick < len(self._after_reply_s) else self._idle_s)
                self._quick += 1
                # a reply going out ends the wait: the next lease may be on its way
                self._cv.wait_for(lambda: self._replies != replies, timeout=delay)

    def push_started(self, **kwargs: Any) -> None:
        """Start the pusher on the first call (Flower passes the same state, store and
        connection every time); the loop goes straight back to pulling."""
        if self._pusher is None:
            self._pusher = threading.Thread(target=self._push_forever, args=(kwargs,),
                                            daemon=True, name="supernode-replies")
            self._pusher.start()

    def _settled(self, n: int) -> None:
        with self._cv:
            self.in_flight = max(0, self.in_flight - n)
            self._replies += n
            self._quick = 0
            self._cv.notify_all()

    def _push_forever(self, kwargs: dict[str, Any]) -> None:
        send, sent = kwargs["send"], [0]

        def counted_send(*args: Any, **kw: Any) -> Any:
            sent[0] += 1  # sent or refused, this message is settled (Flower drops it either way)
            return send(*args, **kw)

        kwargs = {**kwargs, "send": counted_send,
                  "state": _ReplyWait(kwargs["state"], self.stop)}
        while not self.stop.is_set():
            try:
                self._push(**kwargs)
            except _Stopped:
                return
            except Exception:  # noqa: BLE001 - a reply lost is the lease's; go on sending
                log.exception("could not send a reply")
                self.stop.wait(0.5)
            finally:
                # once the whole reply is up (as Flower's own loop, which pulls only then):
                # the SuperNode's log never shows more than ``depth`` messages in flight
                n, sent[0] = sent[0], 0
                if n:
                    self._settled(n)


def install(depth: int = DEPTH) -> Pipeline:
    """Replace the SuperNode loop's pull and push steps with a :class:`Pipeline`'s."""
    module = importlib.import_module(_MODULE)
    quick_object_pulls()  # a lease's objects as they land (protocol/flower_pulls.py)
    pipeline = Pipeline(module._pull_and_store_message, module._push_messages, depth,
                        just_joined=os.environ.get(JUST_JOINED) == "1")
    module._pull_and_store_message = pipeline.pull_next
    module._push_messages = pipeline.push_started
    return pipeline


def main() -> None:
    """``atom-supernode``: ``flower-supernode``'s command line, pipelined."""
    from flwr.supernode.cli import flower_supernode

    install()
    flower_supernode()


if __name__ == "__main__":
    main()

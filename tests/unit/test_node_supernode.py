"""``atom-supernode``: Flower's SuperNode loop, taking the next message while one is worked on.

The pull and push steps are driven here the way Flower's loop drives them
(``start_client_internal``: pull; if nothing, sleep; else push), against fakes with Flower's
semantics: a pull stores at most one message, a push waits for replies and sends each.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from node import supernode
from node.supernode import Pipeline


class FakeLink:
    """The SuperLink's queue for this node and the SuperNode's own state, in one."""

    def __init__(self, queued: int = 0) -> None:
        self.lock = threading.Lock()
        self.queued = queued  # messages waiting in the SuperLink
        self.pulls: list[float] = []  # when each pull asked
        self.stored: list[int] = []  # message ids pulled, in order
        self.replies: list[int] = []  # replies the worker handed over, not yet taken
        self.sent: list[tuple[int, float]] = []  # (message id, when) as they went out
        self.events: list[str] = []

    def pull(self, **kwargs: Any) -> int | None:  # Flower's _pull_and_store_message
        with self.lock:
            self.pulls.append(time.monotonic())
            if not self.queued:
                return None
            self.queued -= 1
            msg = len(self.stored)
            self.stored.append(msg)
            self.events.append(f"received {msg}")
            return 7  # the run id

    def reply(self, msg: int) -> None:  # the worker pushes a task's output
        with self.lock:
            self.replies.append(msg)

    def get_messages_legacy(self, *, is_reply: bool | None = None, **_: Any) -> list[int]:
        with self.lock:
            taken, self.replies = (self.replies, []) if is_reply else ([], self.replies)
            return taken

    def push(self, *, state: Any, send: Any, **_: Any) -> None:  # Flower's _push_messages
        while not (replies := state.get_messages_legacy(is_reply=True)):
            time.sleep(0.5)
        for msg in replies:
            send(msg)

    def send(self, msg: int) -> None:
        with self.lock:
            self.sent.append((msg, time.monotonic()))
            self.events.append(f"sent {msg}")


def _loop(pipeline: Pipeline, link: FakeLink, n: int) -> threading.Thread:
    """Flower's SuperNode loop, for ``n`` messages."""
    def run() -> None:
        for _ in range(n):
            if pipeline.pull_next() is None:
                time.sleep(3)  # never reached: pull_next waits for a message itself
                continue
            pipeline.push_started(state=link, object_store=None, send=link.send,
                                  push_object=None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


def _pipeline(link: FakeLink, **kw: Any) -> Pipeline:
    pull = lambda **k: link.pull(**k)  # noqa: E731
    return Pipeline(pull, link.push, **kw)


def _wait(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_next_message_is_taken_while_the_first_is_worked_on(link: FakeLink) -> None:
    link.queued = 3
    pipeline = _pipeline(link, depth=2)
    loop = _loop(pipeline, link, 3)
    _wait(lambda: len(link.stored) == 2)
    time.sleep(0.3)
    # the second came in before any reply (Flower's loop waits for the first's reply), and
    # no third while two are in flight
    assert link.events == ["received 0", "received 1"] and pipeline.in_flight == 2
    link.reply(0)
    _wait(lambda: len(link.stored) == 3)
    assert link.events == ["received 0", "received 1", "sent 0", "received 2"]
    link.reply(1)
    link.reply(2)
    _wait(lambda: len(link.sent) == 3)
    loop.join(5)
    pipeline.stop.set()
    assert pipeline.in_flight == 0


def test_a_reply_goes_out_as_soon_as_the_worker_hands_it_over(link: FakeLink) -> None:
    link.queued = 1
    pipeline = _pipeline(link)
    _loop(pipeline, link, 1)
    _wait(lambda: pipeline._pusher is not None)
    delays = []
    for _ in range(3):
        time.sleep(0.13)  # somewhere in Flower's 0.5 s look, were it still in charge
        handed = time.monotonic()
        link.reply(0)
        _wait(lambda: len(link.sent) == len(delays) + 1)
        delays.append(link.sent[-1][1] - handed)
    pipeline.stop.set()
    # ~0.05 s (the look at replies); Flower's own 0.5 s look would take ~0.37 s each time
    assert sorted(delays)[1] < 0.2, delays


def test_just_joined_it_asks_soon_then_every_idle_interval(link: FakeLink) -> None:
    pipeline = _pipeline(link, idle_s=0.6, after_reply_s=(0.05, 0.1), just_joined=True)
    _loop(pipeline, link, 1)
    _wait(lambda: len(link.pulls) >= 3)  # at 0, +0.05, +0.15: a joining node's first lease
    first = link.pulls[0]
    assert link.pulls[2] - first < 1.5, link.pulls  # ~0.15 s; Flower's loop: the second at +3 s
    time.sleep(1.0)
    # then the idle interval (0.75, 1.35): never again 0.05 s apart
    gaps = [b - a for a, b in zip(link.pulls[2:], link.pulls[3:])]
    assert gaps and min(gaps) > 0.4, link.pulls
    link.queued = 1
    _wait(lambda: link.stored)
    pipeline.stop.set()


def test_restarted_it_asks_at_the_idle_interval_from_the_start(link: FakeLink) -> None:
    # every SuperNode restarts when the SuperLink does: none of them asks every 0.05 s then
    pipeline = _pipeline(link, idle_s=0.6, after_reply_s=(0.05, 0.1))
    _loop(pipeline, link, 1)
    _wait(lambda: len(link.pulls) >= 2)
    assert link.pulls[1] - link.pulls[0] > 0.4, link.pulls
    link.queued = 1
    _wait(lambda: link.stored)
    pipeline.stop.set()


def test_idle_it_asks_every_idle_interval_and_soon_after_a_reply(link: FakeLink) -> None:
    link.queued = 1
    pipeline = _pipeline(link, idle_s=0.6, after_reply_s=(0.05, 0.1))
    _loop(pipeline, link, 2)
    _wait(lambda: len(link.stored) == 1)
    time.sleep(0.4)  # past the pull that follows a stored message at once
    start = time.monotonic()
    time.sleep(1.4)  # one every 0.6 s
    idle = len([t for t in link.pulls if t >= start])
    assert 1 <= idle <= 3, link.pulls  # (0.05 s apart it would be ~14)
    link.reply(0)
    _wait(lambda: link.sent)
    time.sleep(0.6)
    sent = link.sent[0][1]
    # a pull right after the reply, then at +0.05 and +0.15, where Flower's loop would
    # have slept 3 s (and the idle interval asks once in 0.5 s)
    assert len([t for t in link.pulls if sent <= t < sent + 0.5]) >= 3, (sent, link.pulls)
    pipeline.stop.set()


def test_a_push_that_fails_does_not_stop_the_replies(link: FakeLink) -> None:
    link.queued = 2
    calls = {"n": 0}

    def flaky_push(**kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("SuperLink hiccup")
        link.push(**kw)

    pipeline = Pipeline(lambda **k: link.pull(**k), flaky_push, depth=2)
    _loop(pipeline, link, 2)
    link.reply(0)
    _wait(lambda: link.sent, timeout=5)
    pipeline.stop.set()


def test_install_replaces_the_two_steps_flower_s_loop_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import inspect

    module = importlib.import_module(supernode._MODULE)
    loop_source = inspect.getsource(module.start_client_internal)
    # what the pipeline relies on in Flower's loop (flwr is pinned: this fails loudly if
    # the loop changes shape)
    assert "run_id = _pull_and_store_message(" in loop_source
    assert "_push_messages(" in loop_source
    assert "state.get_messages_legacy(is_reply=True)" in inspect.getsource(
        module._push_messages)
    assert {"state", "object_store", "send", "push_object"} == set(
        inspect.signature(module._push_messages).parameters)
    monkeypatch.setattr(module, "_pull_and_store_message", module._pull_and_store_message)
    monkeypatch.setattr(module, "_push_messages", module._push_messages)
    from flwr.supercore.inflatable import inflatable_utils

    monkeypatch.setitem(inflatable_utils.pull_objects.__kwdefaults__, "initial_backoff",
                        inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"])
    pipeline = supernode.install()
    assert module._pull_and_store_message == pipeline.pull_next
    assert module._push_messages == pipeline.push_started
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05

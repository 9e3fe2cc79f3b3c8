"""A hiccup of the SuperLink does not end a run: the coordinator's reads of the run's status
are tried again with backoff; only a SuperLink that stays down ends it, with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.services import superlink as sl
from protocol.errors import NetworkError


class _Flaky:
    """A Control API client whose first ``fail`` calls raise (an HTTP 500, say)."""

    calls = 0

    def __init__(self, fail: int) -> None:
        self.fail = fail

    def ListRuns(self, request):  # noqa: N802 - Flower's name
        _Flaky.calls += 1
        if _Flaky.calls <= self.fail:
            raise RuntimeError("Server error '500 Internal Server Error'\nmore lines")
        return request

    def close(self) -> None:
        pass


def _link(fail: int, slept: list[float]) -> sl.SuperLink:
    _Flaky.calls = 0
    link = sl.SuperLink(Path("."), None, "127.0.0.1", 1, sleep=slept.append)  # type: ignore[arg-type]
    link._client = lambda: _Flaky(fail)  # type: ignore[method-assign]
    return link


def test_a_read_rides_out_a_few_failures() -> None:
    slept: list[float] = []
    link = _link(fail=3, slept=slept)
    assert link._call("ListRuns", "req", retry=True) == "req"
    assert slept == list(sl.RETRY_DELAYS_S[:3]) and _Flaky.calls == 4


def test_a_superlink_that_stays_down_is_one_line_after_every_try() -> None:
    slept: list[float] = []
    link = _link(fail=100, slept=slept)
    with pytest.raises(NetworkError) as err:
        link._call("ListRuns", "req", retry=True)
    assert slept == list(sl.RETRY_DELAYS_S) and _Flaky.calls == len(sl.RETRY_DELAYS_S) + 1
    assert str(err.value) == (f"SuperLink ListRuns failed {len(sl.RETRY_DELAYS_S) + 1} times: "
                              "Server error '500 Internal Server Error'")


def test_a_write_is_not_repeated() -> None:
    slept: list[float] = []
    link = _link(fail=1, slept=slept)
    with pytest.raises(NetworkError, match="^SuperLink ListRuns failed: Server error"):
        link._call("ListRuns", "req")
    assert slept == [] and _Flaky.calls == 1


def test_a_dead_superlink_is_not_waited_for() -> None:
    import subprocess

    slept: list[float] = []
    link = _link(fail=100, slept=slept)
    link.proc = subprocess.Popen(["true"])
    link.proc.wait()
    with pytest.raises(sl.SuperLinkDied, match="the SuperLink exited"):
        link._call("ListRuns", "req", retry=True)
    assert slept == [] and _Flaky.calls == 0  # `start` restarts it at once

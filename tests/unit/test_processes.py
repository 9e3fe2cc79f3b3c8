"""Which processes count as alive, and the watch that makes a ServerApp leave with its
coordinator (``protocol.processes``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from protocol.processes import alive, process_token, watch_owner

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def test_a_token_names_one_process_for_its_lifetime() -> None:
    me = process_token()
    assert me.startswith(f"{os.getpid()}:") and alive(me)
    pid = me.split(":")[0]
    assert not alive(f"{pid}:1")  # same pid, another start time: a reused pid
    assert not alive("not-a-pid:1")


def test_a_dead_child_is_not_alive_before_or_after_it_is_reaped() -> None:
    child = subprocess.Popen(["sleep", "0.1"])
    token = process_token(child.pid)
    assert alive(token)
    end = time.monotonic() + 10
    while alive(token) and time.monotonic() < end:  # a zombie is dead
        time.sleep(0.05)
    assert not alive(token) and child.poll() is not None
    assert not alive(token)


def test_watch_owner_calls_back_once_the_owner_is_gone() -> None:
    child = subprocess.Popen(["sleep", "0.3"])
    gone = threading.Event()
    watch_owner(process_token(child.pid), gone.set, every_s=0.05)
    assert not gone.wait(0.1)
    assert gone.wait(10)
    child.wait()

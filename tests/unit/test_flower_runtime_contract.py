"""The Flower internals the warm worker stands on are still where it reads them.

``node.flower_runtime`` uses the SuperNode's Runtime API the way Flower's own
``flwr-clientapp`` does; none of it is public API. When flwr is upgraded and any of these
move, this fails loudly (and names what moved) before a node silently stops taking work.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from node import flower_runtime

ROOT = Path(__file__).resolve().parents[2]


def test_flower_is_the_version_the_internals_were_read_from() -> None:
    assert version("flwr") == flower_runtime.FLWR_VERSION
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr=={flower_runtime.FLWR_VERSION}" in deps  # pinned exactly, not a range


@pytest.mark.parametrize("method", [
    "AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
    "PushMessages", "PushObject", "PushTaskOutput", "SendTaskHeartbeat",
])
def test_the_runtime_client_has_each_call(method: str) -> None:
    from flwr.supercore.runtime import RuntimeHttpClient

    assert callable(getattr(RuntimeHttpClient, method, None)), method


def test_the_clientapp_task_helpers_keep_their_shape() -> None:
    from flwr.supernode.runtime import run_clientapp

    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == [
        "client", "message", "context"]


def test_the_messages_and_constants_keep_their_fields() -> None:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PushTaskOutputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor,
    )

    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert {"context", "sub_status", "details"} <= set(
        PushTaskOutputRequest.DESCRIPTOR.fields_by_name)
    assert TaskType.CLIENT_APP == "flwr-clientapp"
    assert (SubStatus.COMPLETED, SubStatus.FAILED) == ("completed", "failed")
    assert isinstance(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, int)
    assert 0 < HEARTBEAT_DEFAULT_INTERVAL <= 60
    assert list(inspect.signature(RuntimeTokenHttpInterceptor).parameters) == ["token"]
    assert "component_name" in inspect.signature(RuntimeVersionHttpInterceptor).parameters
    assert {"master_secret", "protected_methods"} <= set(
        inspect.signature(SuperExecAuthHttpInterceptor).parameters)


def test_the_supernode_runs_without_an_executor_of_its_own() -> None:
    supernode = Path(sys.executable).parent / "flower-supernode"
    out = subprocess.run([str(supernode), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "--isolation" in out.stdout and "process" in out.stdout
    assert "--superexec-auth-secret-file" in out.stdout


def test_object_pulls_start_their_backoff_where_quick_object_pulls_sets_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal as sci

    from protocol.flower_pulls import quick_object_pulls

    from flwr.supernode.runtime import run_clientapp

    # the pulls that wait on a message's objects call these functions: the ServerApp's
    # and the SuperNode's the first, the worker's (through Flower's pull_task_input) the
    # second, which passes its own default on to the first
    assert http_grid.pull_objects is iu.pull_objects is sci.pull_objects
    tree_pull = iu.pull_and_inflate_object_from_tree
    assert run_clientapp.pull_and_inflate_object_from_tree is tree_pull
    for f in (iu.pull_objects, tree_pull):
        monkeypatch.setitem(f.__kwdefaults__, "initial_backoff",
                            f.__kwdefaults__["initial_backoff"])
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF

    assert PULL_INITIAL_BACKOFF == 1  # Flower's own default, what the docstring measured
    quick_object_pulls()
    assert tree_pull.__kwdefaults__["initial_backoff"] == 0.05
    tries = {"n": 0}

    def lands_on_the_third_try(object_id: str) -> bytes:
        tries["n"] += 1
        if tries["n"] < 3:
            raise iu.ObjectUnavailableError(object_id)
        return b"x"

    start = time.monotonic()
    assert iu.pull_objects(["a"], lands_on_the_third_try) == {"a": b"x"}
    # 0.05 + 0.1 s of backoff (+-20%), where Flower's own default waits at least 2.4 s (1 + 2,
    # -20%): the bound tells the two apart with room for a loaded machine
    assert time.monotonic() - start < 2.0 and tries["n"] == 3


def test_a_bounded_task_pull_gives_up_on_objects_that_never_come(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower's SuperNode can leave a task whose message's objects it never stored (its pull
    # ended in RunNotRunningException): the worker's pull of it must end, not wait 2 h
    import time

    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.runtime import run_clientapp

    from node.flower_runtime import bound_task_pulls

    # the worker's pull goes through this function (node.flower_runtime.ClientTask.pull)
    assert run_clientapp.pull_and_inflate_object_from_tree is iu.pull_and_inflate_object_from_tree
    # the SuperNode path that leaves the task behind is still there (docstring of the fix)
    src = inspect.getsource(sci._pull_and_store_message)
    assert src.index("state.create_task(") < src.index("pull_objects(") < \
        src.index("except RunNotRunningException")
    tree_pull = iu.pull_and_inflate_object_from_tree
    for k in ("max_time", "initial_backoff"):
        monkeypatch.setitem(tree_pull.__kwdefaults__, k, tree_pull.__kwdefaults__[k])
    monkeypatch.setitem(tree_pull.__kwdefaults__, "initial_backoff", 0.05)
    assert tree_pull.__kwdefaults__["max_time"] > 3600  # Flower's own: PULL_MAX_TIME
    bound_task_pulls(0.3)
    assert tree_pull.__kwdefaults__["max_time"] == 0.3  # (else the pull below waits 2 h)

    def never(object_id: str) -> bytes:
        raise iu.ObjectUnavailableError(object_id)

    from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=E0611

    tree = ObjectTree(object_id="a" * 64)
    start = time.monotonic()
    with pytest.raises(ObjectPullError):
        tree_pull(tree, never, lambda object_id: None)
    assert time.monotonic() - start < 3.0

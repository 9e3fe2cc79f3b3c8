"""The SuperNode's Runtime API, as the warm worker uses it: the one module that touches Flower
internals on the node.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (torch imported, model
loaded, each time). A SuperNode started with ``--isolation process`` starts no executor of
its own: whoever polls its Runtime API (``AcquireTask``) runs the tasks. The warm worker does,
in one long-lived process, through the calls below — the same ones Flower's own
``flwr-clientapp`` makes (``flwr/supernode/runtime/run_clientapp.py``), minus installing the
run's FAB: the worker checks it against the node policy and runs the installed ClientApp.

These are internal APIs: ``pyproject.toml`` pins flwr exactly and
``tests/unit/test_flower_runtime_contract.py`` fails loudly when one of them moves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import httpx
from flwr.app import Context, Message
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.common.serde import context_to_proto
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message

__all__ = ["TASK_PULL_MAX_S", "ClientTask", "RuntimeTasks", "TaskInput", "bound_task_pulls"]

FLWR_VERSION = "1.42.0"  # the Flower these internals were read from (pinned in pyproject)

# A lease message is small (its bytes travel as blobs) and its objects reach the SuperNode
# within a second or two; Flower waits up to two hours for them.
TASK_PULL_MAX_S = 30.0


def bound_task_pulls(max_s: float = TASK_PULL_MAX_S) -> None:
    """Give up a task whose message's objects are not in the SuperNode after ``max_s``.

    Flower 1.42's SuperNode creates a message's task before it pulls the message's objects
    from the SuperLink, and when that pull ends in ``RunNotRunningException`` (its SuperLink
    restarted mid-pull: the coordinator's outage recovery) it returns without finishing the
    task. The worker claims that task and would wait out ``PULL_MAX_TIME`` (2 h) for objects
    that never come, every later lease queued behind it (seen in the SuperLink-kill test).
    With the bound the worker abandons it and takes the next task; a lease whose objects
    really take that long costs itself only (its deadline reissues it). Internal API: the
    default is read on every call, as in ``protocol.flower_pulls``."""
    inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["max_time"] = max_s


_COMPONENT = "flwr-clientapp"  # the Runtime API checks the caller's component name


def _client(address: str, *interceptors: object) -> RuntimeHttpClient:
    # No Flower retry invoker: on an HTTP 401 it sends SIGINT to its own process (right for
    # a one-task flwr-clientapp, fatal for a worker that outlives its tasks). A failed call
    # raises here and costs one lease at most; the worker loop retries the queue itself.
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=_COMPONENT),
                      *interceptors])


@dataclass(frozen=True)
class TaskInput:
    message: Message
    context: Context
    fab: bytes  # the run's app bundle: checked against the node policy, never unpacked


class ClientTask:
    """One claimed task: pull its input, keep it alive, push the reply, close it."""

    def __init__(self, address: str, token: str) -> None:
        self._client = _client(address, RuntimeTokenHttpInterceptor(token))
        self._context: Context | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="task-heartbeat")

    def pull(self) -> TaskInput:
        self._beat.start()
        message, context, _run, fab = pull_task_input(self._client)
        self._context = context
        return TaskInput(message, context, bytes(fab.content))

    def _heartbeat(self) -> None:
        # Flower's own heartbeat raises SIGINT in the process when the SuperNode drops the
        # task; in a warm worker that would end every later lease too, so just stop beating.
        while not self._stop.wait(HEARTBEAT_DEFAULT_INTERVAL / 3):
            try:
                if not self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    return
            except httpx.HTTPError:
                continue

    def abandon(self) -> None:
        self._stop.set()
        self._client.close()

    def finish(self, reply: Message, *, failed: str | None = None) -> None:
        """Push ``reply`` and close the task (``failed``: why, for the SuperNode's log)."""
        try:
            if self._context is not None:
                push_message(self._client, reply, self._context)
            self._client.PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(self._context) if self._context else None,
                sub_status=SubStatus.FAILED if failed else SubStatus.COMPLETED,
                details=failed or ""))
        finally:
            self.abandon()


_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


class RuntimeTasks:
    """The SuperNode's queue of ClientApp tasks (``--isolation process``). ``secret`` is
    the one the SuperNode was given (``--superexec-auth-secret-file``): without it no other
    process on the machine can claim this node's tasks."""

    def __init__(self, address: str, secret: bytes) -> None:
        self.address = address
        self._client = _client(address, SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods={_ACQUIRE}))

    def acquire(self) -> ClientTask | None:
        """Claim the oldest pending ClientApp task, or None when there is none."""
        res = self._client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            return ClientTask(self.address, res.token)
        return None

    def close(self) -> None:
        self._client.close()

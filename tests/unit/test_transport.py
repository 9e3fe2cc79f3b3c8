"""``coordinator.run.transport.FlowerTransport``: how the loop's messages reach Flower."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.run.transport import MESSAGE_TYPES, FlowerTransport, Outgoing
from protocol.messages import work_nonce


class _Grid:
    def __init__(self) -> None:
        self.pushes: list[list[Message]] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushes.append(list(messages))
        return [f"id{i}" for i in range(len(messages))]


def _content(n: int) -> RecordDict:
    return RecordDict({"work": ConfigRecord({"lease.nonce": f"{n:032x}"})})


def test_a_pass_s_messages_go_to_flower_in_one_push_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_node_id", "_task_id"):  # what a running ServerApp has set
        monkeypatch.setattr(TaskIdentity, name, 1)
    # one push per message cost ~0.25 s each: the last node of a round waited for all
    grid = _Grid()
    msgs = [Outgoing(7, "train", _content(1), 100.0), Outgoing(7, "eval", _content(2), 1.0),
            Outgoing(9, "tasks", _content(3), 50.0)]
    assert FlowerTransport(grid).send(msgs) == ["id0", "id1", "id2"]  # type: ignore[arg-type]
    [pushed] = grid.pushes
    assert [(m.metadata.dst_node_id, m.metadata.message_type) for m in pushed] == [
        (7, MESSAGE_TYPES["train"]), (7, MESSAGE_TYPES["eval"]), (9, MESSAGE_TYPES["tasks"])]
    assert [m.metadata.ttl for m in pushed] == [100.0, 10.0, 50.0]  # at least 10 s
    assert [work_nonce(m.content) for m in pushed] == [  # type: ignore[index]
        f"{n:032x}" for n in (1, 2, 3)]

"""How the run loop reaches nodes: a small interface, with Flower's Grid behind it.

The loop only needs "who is online", "send this", "what came back"; keeping that behind an
interface lets tests drive the real loop with in-process nodes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

__all__ = ["FlowerTransport", "Reply", "Transport", "MESSAGE_TYPES"]

# Flower routes "<action>.<name>" to @app.<action>("<name>") on the ClientApp.
# A tasks lease is an evaluation too: the node's evaluate handler reads its kind off the lease.
MESSAGE_TYPES = {"train": "train.shard", "eval": "evaluate.shard", "tasks": "evaluate.shard"}


@dataclass(frozen=True)
class Reply:
    msg_id: str
    src: int  # Flower node id
    content: RecordDict | None
    error: str | None  # set when the node (or Flower) answered with an error


class Transport(Protocol):
    def online(self) -> list[int]: ...

    def send(self, dst: int, kind: str, content: RecordDict, ttl: float) -> str: ...

    def poll(self, msg_ids: Collection[str]) -> list[Reply]: ...


@dataclass
class FlowerTransport:
    grid: Grid

    def online(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def send(self, dst: int, kind: str, content: RecordDict, ttl: float) -> str:
        msg = Message(content=content, dst_node_id=dst, message_type=MESSAGE_TYPES[kind],
                      ttl=max(ttl, 10.0))
        return next(iter(self.grid.push_messages([msg])))

    def poll(self, msg_ids: Collection[str]) -> list[Reply]:
        if not msg_ids:
            return []
        out = []
        for msg in self.grid.pull_messages(list(msg_ids)):
            md = msg.metadata
            if msg.has_error():
                out.append(Reply(md.reply_to_message_id, int(md.src_node_id), None,
                                 f"{msg.error.reason} (code {msg.error.code})"))
            else:
                out.append(Reply(md.reply_to_message_id, int(md.src_node_id), msg.content, None))
        return out

"""The Flower ClientApp: wiring only. The work itself is ``node.worker.do_work``.

Flower starts this in a fresh process per message; everything it needs comes from the
SuperNode's ``--node-config`` (``home``, ``threads``, ``device``, optionally ``sign-key``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from protocol.errors import ConfigError
from protocol.signing import load_private_key

from .identity import NodeHome
from .limits import NodeLimits
from .progress import ProgressWriter
from .worker import WorkerSettings, do_work

__all__ = ["app"]

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    home = NodeHome(Path(str(cfg["home"])))
    enrollment = home.enrollment()
    if enrollment is None:
        raise ConfigError(f"{home.path} holds no enrollment")
    key_path = Path(str(cfg.get("sign-key") or home.key_path))
    settings = WorkerSettings(node_id=enrollment.node_id, key=load_private_key(key_path),
                              threads=int(cfg.get("threads", 0)),
                              device=str(cfg.get("device", "auto")),
                              limits=NodeLimits.from_node_config(cfg))

    def progress(kind: str, rnd: int, shard: int, steps: int) -> ProgressWriter:
        return ProgressWriter(home.progress_path, kind, rnd, shard, steps)

    return Message(do_work(msg.content, settings, progress), reply_to=msg)


@app.train("shard")
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate("shard")
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)

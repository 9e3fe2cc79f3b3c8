"""The Flower ClientApp: wiring only. The work itself is ``node.worker.do_work``.

Flower starts this in a fresh process per message; everything it needs comes from the
SuperNode's ``--node-config`` (``home``, ``threads``, ``device``, optionally ``sign-key`` and
``max-cache-bytes``) and the node home (enrollment, pinned CA, the blob cache ``blobs/``,
which outlives the process: a model version is fetched once per node, not once per lease).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from protocol.blobstore import BlobDir
from protocol.compression import ErrorFeedback
from protocol.digest import arrays_from_bytes, arrays_to_bytes
from protocol.errors import ConfigError, ProtocolError
from protocol.signing import load_private_key

from .blobs import CoordinatorBlobs
from .identity import NodeHome
from .limits import NodeLimits
from .progress import ProgressWriter, TransferProgress
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
    feedback_path = home.path / "feedback" / f"{enrollment.run_id}.arrays"
    creds = grpc.ssl_channel_credentials(root_certificates=home.ca_path.read_bytes())
    with grpc.secure_channel(enrollment.coordinator_address, creds) as channel:
        coordinator = CoordinatorBlobs(channel)
        limits = NodeLimits.from_node_config(cfg)
        settings = WorkerSettings(node_id=enrollment.node_id, key=load_private_key(key_path),
                                  threads=int(cfg.get("threads", 0)),
                                  device=str(cfg.get("device", "auto")), limits=limits,
                                  cache=BlobDir(home.path / "blobs", limits.max_cache_bytes),
                                  coordinator_blobs=coordinator, uploads=coordinator,
                                  feedback=_load_feedback(feedback_path))

        def progress(kind: str, rnd: int, shard: int, steps: int) -> ProgressWriter:
            return ProgressWriter(home.progress_path, kind, rnd, shard, steps)

        transfer = TransferProgress(home.progress_path)
        reply = do_work(msg.content, settings, progress, transfer)
        _save_feedback(feedback_path, settings.feedback)
        return Message(reply, reply_to=msg)


def _load_feedback(path: Path) -> ErrorFeedback:
    """What top-k left out of this node's earlier updates of the run (a fresh process per
    message: it lives in the node home between leases). Unreadable: start again from none."""
    try:
        return ErrorFeedback(arrays_from_bytes(bytearray(path.read_bytes())))
    except (OSError, ProtocolError):
        return ErrorFeedback()


def _save_feedback(path: Path, feedback: ErrorFeedback | None) -> None:
    if feedback is None or not feedback.residual:
        return
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(arrays_to_bytes(feedback.residual))
    tmp.replace(path)


@app.train("shard")
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate("shard")
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)

"""The Flower ClientApp: wiring only. The work itself is ``node.worker.do_work``.

It runs inside the node's warm worker (``node.warm_worker``): one long-lived process per node
that takes every message the SuperNode receives, so what :class:`NodeSession` holds — the
signing key, the TLS channel to the coordinator, the blob cache, the base models last used,
the built (on CUDA compiled) model, top-k error feedback — lives across leases (torch is
imported once). Run the old way, one ``flwr-clientapp`` process per message, it still works,
paying all of that every time.

Everything it needs comes from the SuperNode's ``--node-config`` (``home``, ``threads``,
``device``, optionally ``sign-key``, ``max-cache-bytes``, ``checkpointing``, ``compile`` and
``policy``: the contribution policy ``join`` wrote as JSON) and the node home (enrollment,
pinned CA, the blob cache ``blobs/``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from protocol.blobstore import BlobDir
from protocol.compression import ErrorFeedback
from protocol.errors import ConfigError
from protocol.signing import load_private_key
from training.data_parallel import InnerPool
from training.model_cache import ModelCache, compile_choice

from .blobs import CoordinatorBlobs
from .gpu import NvmlProbe, cuda_index, load_nvml
from .identity import NodeHome
from .limits import NodeLimits
from .pause import LeaseGate
from .policy import Policy
from .progress import ProgressWriter, TransferProgress
from .worker import BaseModels, WorkerSettings, do_work

__all__ = ["NodeSession", "app", "lease_gate", "next_work", "run_work", "session_for"]

app = ClientApp()


class NodeSession:
    """What a node keeps between leases, built from the SuperNode's node config."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        self.node_config = dict(node_config)
        home = NodeHome(Path(str(node_config["home"])))
        enrollment = home.enrollment()
        if enrollment is None:
            raise ConfigError(f"{home.path} holds no enrollment")
        key_path = Path(str(node_config.get("sign-key") or home.key_path))
        creds = grpc.ssl_channel_credentials(root_certificates=home.ca_path.read_bytes())
        self.channel = grpc.secure_channel(enrollment.coordinator_address, creds)
        self.coordinator = coordinator = CoordinatorBlobs(self.channel)
        limits = NodeLimits.from_node_config(node_config)
        gpus = int(node_config.get("gpus", 1))  # checked by ``join`` (``node.gpu.gpu_count``)
        use_compile = compile_choice(str(node_config.get("compile", "auto")))  # ``join --compile``
        self.home = home
        self.settings = WorkerSettings(
            node_id=enrollment.node_id, key=load_private_key(key_path),
            threads=int(node_config.get("threads", 0)),
            device=str(node_config.get("device", "auto")), limits=limits,
            slowdown=max(1.0, float(node_config.get("slowdown", 1.0))),
            cache=BlobDir(home.path / "blobs", limits.max_cache_bytes),
            coordinator_blobs=coordinator, uploads=coordinator,
            # top-k residuals of this run: in memory, so a worker restart starts them afresh
            feedback=ErrorFeedback(), models=BaseModels(), gate=lease_gate(node_config),
            gpus=gpus, pool=InnerPool(gpus, "cuda", use_compile=use_compile) if gpus > 1
            else None,
            # one per process: the model is built, and on CUDA compiled, once per architecture
            model_cache=ModelCache(use_compile=use_compile),
            checkpointing=str(node_config.get("checkpointing", False)).lower() == "true")

    def handle(self, content: RecordDict) -> RecordDict:
        def progress(kind: str, rnd: int, shard: int, steps: int) -> ProgressWriter:
            return ProgressWriter(self.home.progress_path, kind, rnd, shard, steps)

        return do_work(content, self.settings, progress,
                       TransferProgress(self.home.progress_path))

    def close(self) -> None:
        self.channel.close()
        if self.settings.pool is not None:
            self.settings.pool.close()


def lease_gate(node_config: Mapping[str, Any]) -> LeaseGate:
    """The gate of the policy file ``join`` wrote (``policy`` in the node config), with
    NVML watching this worker's GPU when the policy pauses for a busy one."""
    path = node_config.get("policy")
    if not path:
        return LeaseGate()
    try:
        doc = json.loads(Path(str(path)).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"policy {path}: cannot be read ({err})") from None
    policy = Policy.from_dict(doc, str(path))
    if policy.pause_when_gpu_busy:
        probe = NvmlProbe(load_nvml(), cuda_index(str(node_config.get("device", "auto"))),
                          busy_percent=policy.gpu_busy_percent)
        policy = dataclasses.replace(policy, probe=probe)
    return LeaseGate(policy)


_session: NodeSession | None = None


def session_for(node_config: Mapping[str, Any]) -> NodeSession:
    """The process's session, made on the first message (and again if the config changes)."""
    global _session
    if _session is None or _session.node_config != dict(node_config):
        if _session is not None:
            _session.close()
        _session = NodeSession(node_config)
    return _session


@app.train("shard")
def train(msg: Message, context: Context) -> Message:
    return Message(session_for(context.node_config).handle(msg.content), reply_to=msg)


@app.evaluate("shard")
def evaluate(msg: Message, context: Context) -> Message:
    return Message(session_for(context.node_config).handle(msg.content), reply_to=msg)


# The warm worker's leases taken beside Flower (``node.work_ahead``), in the session of the
# last task Flower gave it.
def next_work(after_nonce: str, context: Context) -> tuple[bytes, float]:
    return session_for(context.node_config).coordinator.next_work(after_nonce)


def run_work(content: RecordDict, context: Context) -> RecordDict:
    return session_for(context.node_config).handle(content)

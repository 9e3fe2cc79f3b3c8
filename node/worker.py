"""Doing one lease: check what arrived, train or evaluate, sign the result.

Pure library code (no Flower process machinery), so tests can run a node's work in-process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flwr.app import RecordDict

from protocol.digest import digest_arrays
from protocol.errors import ProtocolError
from protocol.messages import EVAL_WINDOWS, Update, UpdateMetrics, parse_work, reply_content
from protocol.signing import sign_update
from training.device import pick_device, set_threads
from training.evaluate import evaluate
from training.inner import train_inner
from training.model import GPTConfig

from .limits import NodeLimits, check_work

__all__ = ["WorkerSettings", "do_work"]

Progress = Callable[..., None]


@dataclass(frozen=True)
class WorkerSettings:
    node_id: int
    key: object  # EllipticCurvePrivateKey
    threads: int = 0
    device: str = "auto"
    limits: NodeLimits = NodeLimits()


def _gpt_config(arch: Mapping[str, object]) -> GPTConfig:
    try:
        return GPTConfig(**arch)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"work.arch: not a model configuration ({err})") from None


def do_work(content: RecordDict, settings: WorkerSettings,
            progress: Callable[[str, int, int, int], Progress] | None = None) -> RecordDict:
    """Run the lease in ``content`` and return the signed reply content."""
    check_work(content, settings.limits)  # before anything is decoded or allocated
    lease, model, tokens, arch = parse_work(content)
    if digest_arrays(model) != lease.base_digest:
        raise ProtocolError("work.model: base model does not match lease.base_digest")
    cfg = _gpt_config(arch)
    set_threads(settings.threads or None)
    device = pick_device(settings.device)
    report = progress(lease.kind, lease.round, lease.shard_id, lease.inner_steps) if progress else None
    t0 = time.perf_counter()
    if lease.kind == "train":
        res = train_inner(model, cfg, tokens, steps=lease.inner_steps,
                          batch_size=lease.batch_size, seq_len=lease.seq_len, lr=lease.lr,
                          weight_decay=lease.weight_decay, seed=lease.seed, device=device,
                          progress=report)
        arrays = res.pseudo_grad
        metrics = UpdateMetrics(tokens=res.tokens, steps=res.steps, loss_before=res.loss_before,
                                loss_after=res.loss_after, wall_s=time.perf_counter() - t0)
    else:
        ev = evaluate(model, cfg, tokens, seq_len=lease.seq_len, batch_size=lease.batch_size,
                      device=device)
        arrays = {EVAL_WINDOWS: ev.window_loss}  # the signed commitment, window by window
        metrics = UpdateMetrics(tokens=ev.tokens, steps=0, loss_before=ev.mean_loss,
                                loss_after=ev.mean_loss, wall_s=time.perf_counter() - t0)
    if report is not None:
        report(metrics.steps, metrics.steps, metrics.tokens, done=True)
    update = Update(lease=lease, node_id=settings.node_id,
                    arrays_digest=digest_arrays(arrays), metrics=metrics)
    return reply_content(sign_update(update, settings.key), arrays)

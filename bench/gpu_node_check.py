"""The node's CUDA path, exactly as a lease runs it; prints one JSON object.

    python bench/gpu_node_check.py [--presets tiny,small] [--steps 30]

For each preset: the coordinator side builds a real lease (scheduler, digests, work content),
``node.worker.do_work`` runs it on CUDA (device placement, bf16 autocast), and the coordinator's
verifier judges the signed reply. Reports wall time, tokens/s, peak GPU memory, the loss before
and after, the verdict, and the same lease on the CPU for a ratio (tiny only: CPU is slow).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.config import TrainParams  # noqa: E402
from coordinator.run.scheduler import Scheduler  # noqa: E402
from coordinator.verify.reply import Expected, verify  # noqa: E402
from node.worker import WorkerSettings, do_work  # noqa: E402
from protocol.digest import digest_arrays  # noqa: E402
from protocol.messages import parse_reply, work_content  # noqa: E402
from protocol.signing import generate_key, public_key_pem  # noqa: E402
from training.corpus import build_stdlib_corpus  # noqa: E402
from training.model import PRESETS  # noqa: E402
from training.shards import data_digest  # noqa: E402
from training.state import init_arrays  # noqa: E402

# preset -> (batch_size, seq_len): what a GPU node would be leased
SHAPES = {"tiny": (16, 128), "small": (64, 256), "gpt2": (16, 1024)}


def run_lease(preset: str, tokens: np.ndarray, steps: int, device: str) -> dict:
    cfg = PRESETS[preset]
    batch, seq = SHAPES[preset]
    base = init_arrays(cfg, 0)
    n = steps * batch * seq + 1
    train = TrainParams(inner_steps=steps, batch_size=batch, seq_len=seq, lr=1e-3,
                        deadline_s=600.0)
    sched = Scheduler(run_id="gpu-check", shards=[(0, 0, n)], train=train,
                      data_digest=lambda a, b: data_digest(tokens[a:b]),
                      tokenizer_digest="0" * 64, data_manifest="0" * 64)
    digest = digest_arrays(base)
    lease = sched.lease_train(1, [1], 0, digest)[1]
    content = work_content(lease, base, np.asarray(tokens[:n]), arch=dataclasses.asdict(cfg))
    key = generate_key()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    reply = do_work(content, WorkerSettings(node_id=1, key=key, threads=0, device=device))
    wall = time.perf_counter() - t0
    update, arrays = parse_reply(reply)
    shapes = {k: (tuple(a.shape), a.dtype.str) for k, a in base.items()}
    verdict = verify(update, arrays, Expected(lease=lease, node_id=1,
                                              public_key_pem=public_key_pem(key),
                                              current_version=0, shapes=shapes,
                                              max_norm=float("inf"), now=time.time()))
    out = {"device": device, "steps": steps, "batch": batch, "seq_len": seq,
           "params_M": round(sum(a.size for a in base.values()) / 1e6, 2),
           "wall_s": round(wall, 2), "tok_s": round(update.metrics.tokens / wall),
           "loss_before": round(update.metrics.loss_before, 4),
           "loss_after": round(update.metrics.loss_after, 4),
           "verdict": "accepted" if verdict.accepted else f"{verdict.reason}: {verdict.detail}",
           "update_norm": round(verdict.norm or 0.0, 4)}
    if device.startswith("cuda"):
        out["peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny,small,gpt2")
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        info = build_stdlib_corpus(tmp, max_bytes=8_000_000, val_every=20)
        tokens = np.array(info.tokens()[: info.train_range[1]])
    out: dict = {"cuda": torch.cuda.is_available(), "results": {}, "errors": []}
    if out["cuda"]:
        out["gpu"] = torch.cuda.get_device_name(0)
    devices = ["cuda"] if out["cuda"] else ["cpu"]
    for preset in a.presets.split(","):
        for dev in devices:
            try:
                run_lease(preset, tokens, 2, dev)  # warm-up: CUDA init, kernels
                out["results"][f"{preset}@{dev}"] = run_lease(preset, tokens, a.steps, dev)
            except Exception as err:  # keep going: one failure must not hide the rest
                out["errors"].append(f"{preset}@{dev}: {type(err).__name__}: {err}")
    if out["cuda"] and "tiny@cuda" in out["results"]:
        cpu = run_lease("tiny", tokens, a.steps, "cpu")
        out["results"]["tiny@cpu"] = cpu
        out["tiny_cuda_vs_cpu_speedup"] = round(out["results"]["tiny@cuda"]["tok_s"] / cpu["tok_s"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

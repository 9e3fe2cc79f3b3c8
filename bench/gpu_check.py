"""One-shot check of the training CUDA path; prints one compact JSON object.

    python bench/gpu_check.py            # on a GPU machine: ~1 minute
    python bench/gpu_check.py --quick    # fewer steps

What it measures on CUDA: device placement and bf16 autocast; for the "tiny", "small" and
"gpt2" presets a few inner steps (tokens/s, ms/step, peak memory via
torch.cuda.max_memory_allocated) and an evaluation pass; whether two CUDA runs with the same
seed are bit-identical; and a CPU-vs-CUDA pseudo-gradient agreement check on "tiny" in fp32
(autocast off) over a few steps. Without CUDA it runs a CPU smoke test and says that the
CUDA checks were skipped. Data: a small stdlib corpus built in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.inner as inner  # noqa: E402
import training.model_cache as model_cache  # noqa: E402
from training.corpus import build_stdlib_corpus  # noqa: E402
from training.device import autocast, pick_device  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.model import PRESETS  # noqa: E402
from training.state import init_arrays  # noqa: E402

# preset -> (batch_size, seq_len, steps): enough steps to time past warm-up.
RUNS = {"tiny": (16, 128, 30), "small": (64, 256, 30), "gpt2": (16, 1024, 20)}


def rel_l2(a: dict, b: dict) -> tuple[float, float]:
    num = sum(float(np.sum((a[k] - b[k]).astype(np.float64) ** 2)) for k in a)
    den = sum(float(np.sum(a[k].astype(np.float64) ** 2)) for k in a)
    return (num / max(den, 1e-30)) ** 0.5, max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def train(name: str, tokens: np.ndarray, dev: torch.device, steps: int, seed: int = 0,
          progress=None):
    batch, seq, _ = RUNS[name]
    cfg = PRESETS[name]
    base = init_arrays(cfg, 0)
    return cfg, base, inner.train_inner(
        base, cfg, tokens, steps=steps, batch_size=batch, seq_len=seq,
        lr=1e-3, weight_decay=0.1, seed=seed, device=dev, progress=progress,
    )


def preset_run(name: str, train_tok: np.ndarray, val_tok: np.ndarray, dev: torch.device, quick: bool):
    batch, seq, steps = RUNS[name]
    steps = max(4, steps // 3) if quick else steps
    train(name, train_tok, dev, steps=2)  # warm-up: CUDA context, kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []  # loss.item() syncs every step, so these are true step ends
    cfg, base, r = train(name, train_tok, dev, steps=steps,
                         progress=lambda *_: stamps.append(time.perf_counter()))
    step_s = (stamps[-1] - stamps[0]) / (steps - 1)  # steady state: excludes model build
    peak_train = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    ev = evaluate(base, cfg, val_tok, seq_len=seq, batch_size=batch, device=dev)
    torch.cuda.synchronize()
    ev_s = time.perf_counter() - t
    return {
        "params_M": round(sum(v.size for v in base.values()) / 1e6, 2),
        "batch": batch, "seq_len": seq, "steps": steps,
        "train_tok_s": round(batch * seq / step_s), "ms_per_step": round(1000 * step_s, 1),
        "inner_wall_s": round(r.wall_s, 2),
        "peak_train_MiB": round(peak_train), "peak_eval_MiB": round(torch.cuda.max_memory_allocated() / 2**20),
        "loss_before": round(r.loss_before, 4), "loss_after": round(r.loss_after, 4),
        "eval_tokens": ev.tokens, "eval_s_incl_build": round(ev_s, 2), "eval_loss": round(ev.mean_loss, 4),
        "finite": bool(all(np.isfinite(v).all() for v in r.pseudo_grad.values())),
    }


def agreement(tokens: np.ndarray, dev: torch.device, steps: int = 5) -> dict:
    """CPU vs CUDA pseudo-gradients on tiny, both fp32 (autocast patched off)."""
    real = model_cache.autocast  # the training step's (``forward_backward``)
    model_cache.autocast = lambda device: contextlib.nullcontext()
    try:
        _, _, cpu = train("tiny", tokens, torch.device("cpu"), steps=steps)
        _, _, gpu = train("tiny", tokens, dev, steps=steps)
    finally:
        model_cache.autocast = real
    _, _, bf16 = train("tiny", tokens, dev, steps=steps)
    rel, mx = rel_l2(cpu.pseudo_grad, gpu.pseudo_grad)
    rel_bf16, _ = rel_l2(gpu.pseudo_grad, bf16.pseudo_grad)
    return {
        "steps": steps, "fp32_rel_l2": float(f"{rel:.3g}"), "fp32_max_abs": float(f"{mx:.3g}"),
        "loss_before_cpu": round(cpu.loss_before, 6), "loss_before_cuda": round(gpu.loss_before, 6),
        "bf16_vs_fp32_rel_l2": float(f"{rel_bf16:.3g}"), "ok": rel < 1e-2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--presets", default="tiny,small,gpt2")
    a = p.parse_args()
    out: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "errors": []}
    with tempfile.TemporaryDirectory() as tmp:
        info = build_stdlib_corpus(tmp, max_bytes=3_000_000, val_every=20)
        toks = info.tokens()
        train_tok = np.array(toks[: info.train_range[1]])
        val_tok = np.array(toks[info.val_range[0] : info.val_range[1]])
    if not out["cuda"]:
        out["skipped"] = "CUDA not available: CUDA checks skipped; ran a CPU smoke test only"
        _, _, r = train("tiny", train_tok, torch.device("cpu"), steps=3)
        out["cpu_smoke"] = {"loss_before": round(r.loss_before, 4), "wall_s": round(r.wall_s, 2)}
        print(json.dumps(out))
        return

    dev = pick_device("cuda")
    out["device"] = torch.cuda.get_device_name(dev)
    out["capability"] = list(torch.cuda.get_device_capability(dev))
    with autocast(dev):
        y = torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)
    out["bf16_autocast"] = y.dtype == torch.bfloat16 and y.device.type == "cuda"
    out["presets"] = {}
    for name in a.presets.split(","):
        try:
            out["presets"][name] = preset_run(name, train_tok, val_tok, dev, a.quick)
        except Exception as e:  # keep going: one failure should not hide the other numbers
            out["errors"].append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
        torch.cuda.empty_cache()
    try:
        _, _, r1 = train("tiny", train_tok, dev, steps=5, seed=3)
        _, _, r2 = train("tiny", train_tok, dev, steps=5, seed=3)
        out["cuda_repeatable"] = all(np.array_equal(r1.pseudo_grad[k], r2.pseudo_grad[k]) for k in r1.pseudo_grad)
        out["cuda_repeat_rel_l2"] = float(f"{rel_l2(r1.pseudo_grad, r2.pseudo_grad)[0]:.3g}")
        out["cpu_vs_cuda"] = agreement(train_tok, dev)
    except Exception as e:
        out["errors"].append(f"agreement: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

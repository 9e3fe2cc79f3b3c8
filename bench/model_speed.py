"""Inner-loop speed per model preset: a fresh model per lease against the warm worker's kept
model (``training.model_cache``), and what activation checkpointing costs.

    python bench/model_speed.py                    # CPU: tiny and small of every family
    python bench/model_speed.py --presets tiny --json
    python bench/model_speed.py --presets small,124m,1b --peak-flops 989e12   # on a GPU

For each family and preset, ``--leases`` leases of ``--steps`` steps are trained three ways
through ``training.inner.train_inner``: ``fresh`` (a model built per lease, eager: the
coordinator's path, and every node's before the cache), ``cached`` (one ``ModelCache``, its
first lease, which builds and on CUDA compiles, reported apart) and ``ckpt`` (cached, with
activation checkpointing). Reported: tokens/s over whole leases, the steady step time (from
the progress stamps; ``loss.item()`` syncs every step), the per-lease overhead (lease wall
minus its steps: build or refill, the fp32 first-batch loss, copying the weights out), the
cost of building a model against refilling one, that overhead phase by phase (``phases``:
refill + fp32 first-batch loss, pseudo-gradient), and ratios against ``fresh``. ``--ways``
chooses the kept-model ways (``ckpt`` compiles a second model on CUDA).

On CUDA also a standalone ``torch.compile`` + bf16 + fused AdamW step of the same model on
random tokens (no sampling, no per-step sync): the node's speed against it (``node_step/standalone``, steady steps; ``node_lease/standalone``,
whole leases), and the MFU of each, training FLOPs per token (``flops_per_token``: 6 x params
plus attention) x tokens/s over ``--peak-flops`` (default 989e12: H100/H200 bf16 dense).

A preset whose estimated time (from one probe step) exceeds ``--max-preset-s`` is skipped and
listed under ``skipped`` with the estimate: on 2 CPU cores the ``small`` presets are close.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.device import autocast, pick_device  # noqa: E402
from training.families import (  # noqa: E402
    ArchError, arch_of, build_model, param_count, run_spec,
)
from training.inner import (  # noqa: E402
    first_batch_loss, inner_optimizer, pseudo_gradient, train_inner,
)
from training.model_cache import ModelCache  # noqa: E402
from training.state import arrays_to_model, init_arrays, load_arrays  # noqa: E402

FAMILIES = ("gpt", "llama", "qwen2", "gpt2")


def _lease(base: dict, spec: Any, tokens: np.ndarray, a: argparse.Namespace,
           dev: torch.device, seed: int, **kw: Any) -> tuple[float, float]:
    """One lease: (wall s, steady s per step)."""
    stamps: list[float] = []
    t = time.perf_counter()
    train_inner(base, spec, tokens, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq,
                lr=1e-3, weight_decay=0.1, seed=seed, device=dev,
                progress=lambda *_: stamps.append(time.perf_counter()), **kw)
    wall = time.perf_counter() - t
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else wall
    return wall, step


def _summary(runs: list[tuple[float, float]], a: argparse.Namespace) -> dict[str, float]:
    wall = statistics.median(r[0] for r in runs)
    step = statistics.median(r[1] for r in runs)
    return {"tok_s": a.steps * a.batch_size * a.seq / wall, "lease_ms": 1e3 * wall,
            "step_ms": 1e3 * step, "overhead_ms": 1e3 * max(0.0, wall - a.steps * step)}


def _build_vs_refill(base: dict, spec: Any, dev: torch.device, reps: int = 3
                     ) -> tuple[float, float]:
    builds, refills = [], []
    model = arrays_to_model(base, spec, dev)
    for _ in range(reps):
        t = time.perf_counter()
        arrays_to_model(base, spec, dev)
        _sync(dev)
        builds.append(time.perf_counter() - t)
        t = time.perf_counter()
        load_arrays(model, base)
        _sync(dev)
        refills.append(time.perf_counter() - t)
    return 1e3 * statistics.median(builds), 1e3 * statistics.median(refills)


def _phases(base: dict, spec: Any, tokens: np.ndarray, a: argparse.Namespace,
            dev: torch.device, reps: int = 3) -> dict[str, float]:
    """A lease's costs beyond its steps, phase by phase (median ms, synced): refilling the
    kept model with the base and the fp32 loss of the first batch (``first_batch_loss`` on
    a held model: the same work ``train_inner`` does before its steps), and the
    pseudo-gradient (base up, difference down)."""
    model = arrays_to_model(base, spec, dev)
    kw = dict(batch_size=a.batch_size, seq_len=a.seq, seed=0, device=dev, model=model)
    loss, grad = [], []
    for _ in range(reps):
        t = time.perf_counter()
        first_batch_loss(base, spec, tokens, **kw)  # .item() syncs
        loss.append(time.perf_counter() - t)
        t = time.perf_counter()
        pseudo_gradient(base, model)  # on the host when it returns
        grad.append(time.perf_counter() - t)
    return {"refill_and_loss_before_ms": 1e3 * statistics.median(loss),
            "pseudo_gradient_ms": 1e3 * statistics.median(grad)}


def _standalone_step_s(spec: Any, a: argparse.Namespace, dev: torch.device) -> float:
    """Seconds per step of a plain compiled bf16 training loop (CUDA): the ceiling."""
    model = build_model(spec).to(dev)
    step_fn = torch.compile(model)
    opt = inner_optimizer(model, 1e-3, 0.1, dev)
    x = torch.randint(0, spec.vocab_size, (a.batch_size, a.seq), device=dev)

    def step() -> None:
        with autocast(dev):
            _, loss = step_fn(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile and warm the allocator
        step()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    _sync(dev)
    return (time.perf_counter() - t) / a.steps


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(family: str, preset: str, a: argparse.Namespace, dev: torch.device,
            tokens: np.ndarray) -> dict[str, Any]:
    """One preset's numbers; {"skipped": why} when it would take too long."""
    spec = run_spec(family, preset, {}, 256)
    if a.seq > spec.block_size:
        return {"skipped": f"seq_len {a.seq} exceeds block_size {spec.block_size}"}
    base = init_arrays(spec, 0)
    n = param_count(spec)
    one_step = argparse.Namespace(**{**vars(a), "steps": 1})
    # every step of 3 ways x leases + the caches' first leases, each costed as a whole
    # one-step lease (its build and copies counted every step: an over-estimate)
    runs = 3 * a.leases * a.steps + 2
    estimate = _lease(base, spec, tokens, one_step, dev, 0)[0] * runs
    if estimate > a.max_preset_s:  # the process's first lease pays torch's warm-up: again
        estimate = _lease(base, spec, tokens, one_step, dev, 0)[0] * runs
    if estimate > a.max_preset_s:
        return {"skipped": f"estimated {estimate:.0f} s > --max-preset-s {a.max_preset_s:g}"}
    out: dict[str, Any] = {"params": n}
    ways: dict[str, dict[str, Any]] = {"fresh": {}}
    first: dict[str, float] = {}
    for name, ckpt in (("cached", False), ("ckpt", True)):
        if name not in a.ways:
            continue
        ways[name] = {"models": ModelCache(), "checkpointing": ckpt}
        t = time.perf_counter()
        _lease(base, spec, tokens, a, dev, 99, **ways[name])  # builds; on CUDA compiles
        first[name] = 1e3 * (time.perf_counter() - t)
    # ways interleaved lease by lease: a neighbour's load on a shared machine hits each alike
    runs_of: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for seed in range(a.leases):
        for name, kw in ways.items():
            runs_of[name].append(_lease(base, spec, tokens, a, dev, seed, **kw))
    for name, kw in ways.items():
        out[name] = _summary(runs_of[name], a)
        if name in first:
            out[name] |= {"first_lease_ms": first[name], "compiled": kw["models"].compiles(dev)}
    out["build_ms"], out["refill_ms"] = _build_vs_refill(base, spec, dev)
    out["phases"] = _phases(base, spec, tokens, a, dev)
    fresh = out["fresh"]["tok_s"]
    out["ratios"] = {f"{name}/fresh": out[name]["tok_s"] / fresh for name in ways
                     if name != "fresh"}
    if "ckpt" in ways:
        out["ratios"]["ckpt/cached"] = out["ckpt"]["tok_s"] / out["cached"]["tok_s"]
    if dev.type == "cuda":
        alone = _standalone_step_s(spec, a, dev)
        tok = a.batch_size * a.seq
        # the node's step over whole leases (its per-lease costs included) and in the steady
        # state, against the standalone loop's steady step
        node_lease = tok / out["cached"]["tok_s"]
        node = out["cached"]["step_ms"] / 1e3
        out["standalone_step_ms"] = 1e3 * alone
        out["ratios"]["node_step/standalone"] = alone / node  # speed: >= 0.95 is the goal
        out["ratios"]["node_lease/standalone"] = alone / node_lease
        flops = flops_per_token(spec, a.seq) * tok
        out["mfu"] = {"node": flops / node / a.peak_flops,
                      "node_lease": flops / node_lease / a.peak_flops,
                      "standalone": flops / alone / a.peak_flops}
        torch.cuda.empty_cache()
    return out


def flops_per_token(spec: Any, seq: int) -> float:
    """Training FLOPs per token, PaLM's appendix B (nanoGPT's ``estimate_mfu``): 6 per
    parameter plus the attention scores, 12 x layers x width x context."""
    arch = arch_of(spec)
    layers = arch.get("n_layer", arch.get("num_hidden_layers"))
    width = arch.get("n_embd", arch.get("hidden_size"))
    return 6 * param_count(spec) + 12 * int(layers) * int(width) * seq


def _rounded(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return float(f"{x:.4g}") if isinstance(x, float) else x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, help="per lease [default: 3 on CPU, 20 on CUDA]")
    p.add_argument("--leases", type=int, default=5, help="timed leases per way")
    p.add_argument("--batch-size", type=int, help="[default: 4 on CPU, 16 on CUDA]")
    p.add_argument("--seq-len", type=int, help="[default: 64 on CPU, 1024 on CUDA, "
                                               "at most the preset's block size]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--max-preset-s", type=float, default=60.0)
    p.add_argument("--ways", default="cached,ckpt",
                   help="besides fresh: cached (the kept model), ckpt (kept, with activation "
                        "checkpointing); each compiles once on CUDA")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="the device's dense bf16 peak, for MFU [default: H100/H200]")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args(argv)
    a.ways = {w.strip() for w in a.ways.split(",")}
    if not a.ways <= {"cached", "ckpt"} or "cached" not in a.ways:
        p.error("--ways must list cached, and may add ckpt")
    dev = pick_device(a.device)
    cuda = dev.type == "cuda"
    a.steps = a.steps or (20 if cuda else 3)
    a.batch_size = a.batch_size or (16 if cuda else 4)
    requested_seq = a.seq_len or (1024 if cuda else 64)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    tokens = np.random.default_rng(0).integers(0, 256, 1 << 18).astype(np.uint16)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": a.steps,
        "leases": a.leases, "batch_size": a.batch_size, "results": {}, "skipped": {}}
    for family in a.families.split(","):
        for preset in a.presets.split(","):
            key = f"{family}/{preset}"
            try:
                block = run_spec(family, preset, {}, 256).block_size
            except ArchError as err:
                out["skipped"][key] = str(err)
                continue
            a.seq = min(requested_seq, block)
            t = time.perf_counter()
            res = measure(family, preset, a, dev, tokens)
            if "skipped" in res:
                out["skipped"][key] = res["skipped"]
                _say(a, f"{key:12s} skipped: {res['skipped']}")
                continue
            res["seq_len"], res["wall_s"] = a.seq, time.perf_counter() - t
            out["results"][key] = res = _rounded(res)
            r = res["ratios"]
            ckpt = f"  ckpt x{r['ckpt/fresh']:.3f}" if "ckpt/fresh" in r else ""
            _say(a, f"{key:12s} {res['params'] / 1e6:6.2f}M  fresh {res['fresh']['tok_s']:8.0f} "
                    f"tok/s  cached x{r['cached/fresh']:.3f}{ckpt}  "
                    f"overhead/lease {res['fresh']['overhead_ms']:.0f} -> "
                    f"{res['cached']['overhead_ms']:.0f} ms  build {res['build_ms']:.0f} ms, "
                    f"refill {res['refill_ms']:.1f} ms"
                    + (f"  node/standalone x{r['node_step/standalone']:.2f}  MFU "
                       f"{res['mfu']['node']:.1%}" if cuda else ""))
    if a.json:
        print(json.dumps(out))
    return 0


def _say(a: argparse.Namespace, text: str) -> None:
    if not a.json:
        print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""A compiling node's first lease of a model: from the lease's arrival to its update.

On CUDA the warm worker compiles its model (``torch.compile``) on the first lease of an
architecture: 27-40 s for a ~124M model on an H200, where the lease's steps take seconds.
Three ways of paying it, each in a process of its own (a compile is cached in-process):

- ``serial``: the lease's blobs arrive (``--fetch-s`` of waiting: a download is network
  time), then the lease builds and compiles its model — a node without the warm-up;
- ``overlap``: ``ModelCache.warm`` compiles while the blobs arrive on a thread, as
  ``node.worker`` does, then the lease refills the compiled model;
- ``restarted``: ``serial`` again in a new process on the compile cache ``serial`` left on
  disk (inductor's FX graph and AOT autograd caches under ``TORCHINDUCTOR_CACHE_DIR``): a
  node's worker after a restart, which keeps that cache in the node's home.

A throwaway process compiles the family's ``tiny`` preset first (``--no-prime`` skips it):
on a fresh machine the first compile also reads torch's and Triton's files from disk and
starts their tools, and whichever way ran first would pay that (a first run without it on
an H200: serial 56.6 s, overlap 42.4 s, where the fetch it hid was 3.6 s). Each process
also times a second lease (the steady lease): ``compile_exposed_s`` = first update - fetch
- steady lease, the compile (and build) the node waited for. Ratios are against ``serial``
(lower is better). ``--fetch-s`` defaults to the fp32 model over a 1 Gbit/s link.

Measured on an H200 (docs/models.md): a compile on a thread beside the lease's was slower
than on the lease's own thread (gpt2: overlap 32.1 s against serial 30.4 s, primed), so
the worker and ``overlap`` compile on the training thread and download on another.

    python bench/first_lease.py --family llama --preset 124m --json          # on a GPU
    python bench/first_lease.py --ways serial,overlap,overlap-thread --json  # the thread's cost
    python bench/first_lease.py --device cpu --backend aot_eager --preset tiny  # the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = ("serial", "overlap", "restarted")
OPTIONAL = ("overlap-thread",)  # the compile on a thread beside the lease's: slower, why?
LINK_BYTES_S = 125e6  # 1 Gbit/s


def child(a: argparse.Namespace) -> dict[str, float]:
    """One way's numbers, in this process: seconds to the first update, and a steady lease."""
    import numpy as np

    from torch._dynamo.utils import counters

    from training.device import pick_device
    from training.families import run_spec
    from training.inner import train_inner
    from training.model_cache import ModelCache
    from training.state import init_arrays

    dev = pick_device(a.device)
    spec = run_spec(a.family, a.preset, {}, 256)
    base = init_arrays(spec, 0)
    tokens = np.random.default_rng(0).integers(0, 256, 1 << 18).astype(np.uint16)
    cache = ModelCache(use_compile=True, backend=a.backend)

    def lease(seed: int) -> None:
        train_inner(base, spec, tokens, steps=a.steps, batch_size=a.batch_size,
                    seq_len=a.seq_len, lr=1e-3, weight_decay=0.1, seed=seed, device=dev,
                    models=cache)

    def warm() -> None:
        warmed.append(cache.warm(spec, dev, batch_size=a.batch_size, seq_len=a.seq_len))

    warmed: list[bool] = []
    t = time.perf_counter()
    if a.child == "overlap":  # as node.worker: the downloads on a thread, the compile here
        fetch = threading.Thread(target=time.sleep, args=(a.fetch_s,))
        fetch.start()
        warm()
        fetch.join()
    elif a.child == "overlap-thread":  # the compile on a thread, the downloads here
        compiling = threading.Thread(target=warm)
        compiling.start()
        time.sleep(a.fetch_s)
        compiling.join()
    else:
        time.sleep(a.fetch_s)
    graphs_before = counters["stats"]["unique_graphs"]
    lease(1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    lease(2)
    steady = time.perf_counter() - t
    return {"first_update_s": first, "steady_lease_s": steady, "warmed": warmed == [True],
            "compile_exposed_s": max(0.0, first - a.fetch_s - steady),
            # graphs dynamo compiled during the leases: > 0 after a warm-up is a recompile
            "graphs_in_leases": counters["stats"]["unique_graphs"] - graphs_before}


def run_way(way: str, a: argparse.Namespace, cache_dir: str) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", "serial" if way in ("restarted", "prime")
            else way,
            "--family", a.family, "--preset", a.preset, "--device", a.device,
            "--backend", a.backend, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
            "--seq-len", str(a.seq_len), "--fetch-s", str(a.fetch_s)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the {way} process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama")
    p.add_argument("--preset", default="124m")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--fetch-s", type=float, help="the blobs' download [default: the fp32 "
                                                 "model over 1 Gbit/s]")
    p.add_argument("--no-prime", dest="prime", action="store_false",
                   help="skip the throwaway compile of the tiny preset that runs first")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--ways", default=",".join(WAYS),
                   help=f"of {', '.join(WAYS + OPTIONAL)} (restarted needs serial)")
    p.add_argument("--child", choices=("serial", "overlap", "overlap-thread"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ways = [w.strip() for w in a.ways.split(",") if w.strip()]
    if not ways or not set(ways) <= set(WAYS + OPTIONAL) or "serial" not in ways:
        p.error(f"--ways: a list of {', '.join(WAYS + OPTIONAL)} that names serial")
    if a.child:
        print(json.dumps(child(a)))
        return 0
    from training.families import param_count, run_spec

    spec = run_spec(a.family, a.preset, {}, 256)
    a.seq_len = min(a.seq_len, spec.block_size)
    if a.fetch_s is None:
        a.fetch_s = round(4 * param_count(spec) / LINK_BYTES_S, 2)
    out: dict[str, Any] = {"family": a.family, "preset": a.preset, "params": param_count(spec),
                           "backend": a.backend, "steps": a.steps, "batch_size": a.batch_size,
                           "seq_len": a.seq_len, "fetch_s": a.fetch_s, "ways": {}}
    with tempfile.TemporaryDirectory(prefix="atom-first-lease-") as tmp:
        if a.prime:  # the machine's first compile reads torch's and Triton's files from
            # disk and starts their tools: a cost of the first process, not of a way
            t = time.perf_counter()
            tiny = run_spec(a.family, "tiny", {}, 256).block_size
            run_way("prime", argparse.Namespace(**{**vars(a), "preset": "tiny",
                                                   "seq_len": min(a.seq_len, tiny)}),
                    os.path.join(tmp, "prime"))
            out["prime_s"] = time.perf_counter() - t
        # restarted reuses serial's cache folder, so it runs after it; the others get their own
        for way in sorted(ways, key=lambda w: w == "restarted"):
            cache_dir = os.path.join(tmp, "serial" if way == "restarted" else way)
            out["ways"][way] = res = run_way(way, a, cache_dir)
            if not a.json:
                print(f"{way:14s} first update {res['first_update_s']:7.2f} s  (compile waited "
                      f"{res['compile_exposed_s']:6.2f} s, steady lease "
                      f"{res['steady_lease_s']:.2f} s, graphs compiled in the leases "
                      f"{res['graphs_in_leases']})", flush=True)
    serial = out["ways"]["serial"]["first_update_s"]
    out["ratios"] = {f"{w}/serial": out["ways"][w]["first_update_s"] / serial
                     for w in out["ways"] if w != "serial"}
    if a.json:
        print(json.dumps(out))
    else:
        print("  ".join(f"{k} x{v:.3f}" for k, v in out["ratios"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

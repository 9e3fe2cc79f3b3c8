"""The plan to 10,000 GPUs in figures: what one coordinator carries for a 1B and a 7B model.

Per-unit costs are **measured here** (this machine, this code):

- bytes per parameter of a train update under each ``[compression]`` scheme (``encode`` of a
  4M-parameter Gaussian update: int8 blocks of 256, top-k 1%);
- coordinator CPU seconds per parameter to screen one update as ``verify.reply`` does
  (SHA-256 of the payload, ``decode``, the L2 norm), per scheme;
- ledger rows and write transactions per lease, and write transactions per second the loop
  sustained, on SQLite and PostgreSQL: from ``bench/scale.py --json`` outputs (``--scale``
  files; without them the figures of docs/scale.md's own run are used).

The rest are **assumptions**, each a flag: lease length, the coordinator's NIC, cores and
GPUs, the GPUs' effective bf16 FLOP/s, how many requests one Flower SuperLink serves. The
verification FLOPs follow the run's defaults: the usefulness scores are three forward passes
over ``usefulness_tokens`` (4,096) tokens per update, 2 x params FLOPs per token.

For each model and scheme it prints what one coordinator carries before each resource runs
out and which breaks first; ``--json`` prints one object last.

    python bench/scale_plan.py
    python bench/scale_plan.py --scale sqlite.json --scale pg.json --lease-s 900 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol.compression import Compression, decode, encode, encoded_bytes  # noqa: E402

MODELS = {"1B": 1.0e9, "7B": 7.0e9}
SCHEMES = {"none": Compression("none"), "int8": Compression("int8"),
           "topk1%": Compression("topk", fraction=0.01)}
USEFULNESS_TOKENS = 4096  # [verify] usefulness_tokens default
SCORE_PASSES = 3  # base on the own shard (shared per shard), local on held-out and on own shard
# Measured by bench/scale.py at 1,000 nodes (docs/scale.md); replaced by --scale files.
DEFAULT_LEDGER = {"sqlite": {"rows_per_lease": 4.6, "writes_per_lease": 3.0,
                             "writes_per_s": 700.0},
                  "postgresql": {"rows_per_lease": 4.6, "writes_per_lease": 3.0,
                                 "writes_per_s": 400.0}}


def _median(f: Any, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def measure_updates(params: int = 1 << 22) -> dict[str, dict[str, float]]:
    """Bytes per parameter and screening CPU seconds per parameter, per scheme."""
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.normal(0, 1e-3, params // 4).astype(np.float32) for i in range(4)}
    shapes = {k: (a.shape, "<f4") for k, a in arrays.items()}
    out = {}
    for name, codec in SCHEMES.items():
        enc = encode(arrays, codec)
        payload = b"".join(np.ascontiguousarray(a).tobytes() for a in enc.values())

        def screen(enc: Any = enc, payload: bytes = payload, codec: Compression = codec) -> None:
            hashlib.sha256(payload).digest()
            dec = decode(enc, codec, shapes, math.inf)
            math.sqrt(sum(float(np.dot(a, a)) for a in dec.values()))

        out[name] = {"bytes_per_param": encoded_bytes(enc) / params,
                     "screen_cpu_s_per_param": _median(screen) / params}
    return out


def ledger_costs(files: list[Path]) -> dict[str, dict[str, float]]:
    costs = {k: dict(v) for k, v in DEFAULT_LEDGER.items()}
    for f in files:
        doc = json.loads(f.read_text().strip().splitlines()[-1])
        for r in doc.get("runs", [doc]):
            costs[r["ledger"]] = {
                "rows_per_lease": r["ledger_rows_per_lease"],
                "writes_per_lease": r["ledger_writes"] / max(1, r["leases_issued"]),
                # write transactions back to back: the loop's mean write time
                "writes_per_s": 1000.0 / max(1e-6, r["ledger_write_ms_mean"]),
            }
    return costs


def capacity(params: float, unit: dict[str, float], delta: dict[str, float],
             ledger: dict[str, float], a: argparse.Namespace) -> dict[str, Any]:
    """Nodes one coordinator carries before each resource runs out (per lease of
    ``a.lease_s`` seconds each node sends one update and fetches one version: the int8
    change to the version it has (``delta``), or with ``--full-versions`` the fp32 model)."""
    per_s = 1.0 / a.lease_s  # leases per node per second
    up = unit["bytes_per_param"] * params  # an update
    down = (delta["bytes_per_param"] if a.delta else 4.0) * params  # the next version
    nic = a.nic_gbps * 1e9 / 8
    verify_flops = SCORE_PASSES * 2 * params * USEFULNESS_TOKENS
    limits = {
        "ingress (updates in)": nic / (up * per_s),
        "egress (versions out)": nic / (down * per_s),
        "screen CPU": a.cores / (unit["screen_cpu_s_per_param"] * params * per_s),
        "verify GPUs": a.gpus * a.gpu_tflops * 1e12 / (verify_flops * per_s),
        "ledger writes": ledger["writes_per_s"] / (ledger["writes_per_lease"] * per_s),
        "SuperLink requests": a.superlink_rps / (1 / 3 + 1 / 30 + 2 * per_s),
        # the buffer holds K decoded fp32 updates and the store S + 1 fp32 versions
        "memory (buffer K = nodes)": (a.ram_gb * 1e9 - 5 * 4 * params) / (4 * params),
    }
    first = min(limits, key=limits.get)  # type: ignore[arg-type]
    return {"update_mb": round(up / 1e6, 1), "version_mb": round(down / 1e6, 1),
            "limits": {k: int(max(0, v)) for k, v in limits.items()},
            "breaks_first": first, "nodes": int(max(0, limits[first])),
            "ledger_rows_per_day_at_10k": int(1e4 * 86400 * per_s * ledger["rows_per_lease"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=Path, action="append", default=[],
                   help="a bench/scale.py --json output (SQLite or PostgreSQL); repeatable")
    p.add_argument("--ledger", choices=("sqlite", "postgresql"), default="postgresql")
    p.add_argument("--lease-s", type=float, default=600.0, help="seconds one lease takes")
    p.add_argument("--nic-gbps", type=float, default=10.0, help="the coordinator's network")
    p.add_argument("--cores", type=int, default=32, help="the coordinator's CPU cores")
    p.add_argument("--gpus", type=int, default=8, help="the coordinator's verification GPUs")
    p.add_argument("--gpu-tflops", type=float, default=400.0,
                   help="effective bf16 TFLOP/s per GPU (an H100 at ~40%% MFU)")
    p.add_argument("--ram-gb", type=float, default=1024.0, help="the coordinator's memory")
    p.add_argument("--superlink-rps", type=float, default=1000.0,
                   help="requests/s one SuperLink (one uvicorn worker) serves")
    p.add_argument("--full-versions", dest="delta", action="store_false",
                   help="nodes fetch whole fp32 versions, not the change to the last one")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    units = measure_updates()
    ledgers = ledger_costs(a.scale)
    out: dict[str, Any] = {"measured": {"updates": units, "ledger": ledgers},
                           "assumed": {k: v for k, v in vars(a).items()
                                       if k not in ("scale", "json")},
                           "plan": {}}
    for model, params in MODELS.items():
        for scheme, unit in units.items():
            c = capacity(params, unit, units["int8"], ledgers[a.ledger], a)
            out["plan"][f"{model}/{scheme}"] = c
            print(f"{model:3} {scheme:7} update {c['update_mb']:>8} MB  version "
                  f"{c['version_mb']:>8} MB  carries {c['nodes']:>7} nodes; breaks first: "
                  f"{c['breaks_first']}", file=sys.stderr)
            for k, v in c["limits"].items():
                print(f"      {k:28} {v:>9}", file=sys.stderr)
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

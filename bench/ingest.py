"""Can the coordinator keep up with its nodes? Ingest and aggregation against their ceilings.

For K int8-encoded updates of a model (what nodes upload), measured in one process:

- ``sha256_MBps``: SHA-256 over the encoded bytes, the physical ceiling (every byte that
  arrives is hashed once);
- ``ingest_MBps``: the coordinator's whole path per update — the upload hashed as it is
  written into the blob store (``PutBlob``'s ``Partial``), read back, parsed, ``verify``
  (signature, binding, structure checks, decode, finite, norm) — and then the token-weighted
  mean of all K, over the same encoded bytes; ``ingest_over_sha256`` is their ratio;
- ``aggregate_over_flower``: Flower's ``aggregate_arrayrecords`` time over ours, on the same
  decoded updates (above 1: ours is faster).

    python bench/ingest.py                  # small (10.7M parameters), K = 8, median of 3
    python bench/ingest.py --preset tiny --updates 16 --json

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402

from coordinator.aggregators import get_aggregator  # noqa: E402
from coordinator.verify.reply import Expected, verify  # noqa: E402
from protocol.blobstore import BlobDir  # noqa: E402
from protocol.compression import Compression, encode  # noqa: E402
from protocol.digest import arrays_from_bytes, arrays_to_bytes, digest_bytes  # noqa: E402
from protocol.messages import Lease, Update, UpdateMetrics  # noqa: E402
from protocol.signing import generate_key, public_key_pem, sign_update  # noqa: E402
from training.model import PRESETS  # noqa: E402
from training.state import init_arrays  # noqa: E402

_CHUNK = 2 << 20  # what PutBlob streams


def _updates(preset: str, k: int, seed: int = 0) -> tuple[dict[str, Any], list[bytes]]:
    base = init_arrays(PRESETS[preset], 0)
    rng = np.random.default_rng(seed)
    shapes = {n: (a.shape, "<f4") for n, a in base.items()}
    codec = Compression("int8")
    payloads = [arrays_to_bytes(encode({n: (rng.standard_normal(a.shape) * 1e-3).astype(
        np.float32) for n, a in base.items()}, codec)) for _ in range(k)]
    return shapes, payloads


def _signed(payload: bytes, key: Any, i: int) -> tuple[Update, Lease]:
    lease = Lease(run_id="r", round=1, shard_id=i, kind="train", base_version=0,
                  base_digest="a" * 64, data_start=0, data_end=1000, data_digest="b" * 64,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  inner_steps=240, batch_size=8, seq_len=128, lr=1e-3, weight_decay=0.1,
                  seed=i, deadline=time.time() + 3600, nonce=f"{i:032x}")
    update = Update(lease=lease, node_id=1, arrays_digest=digest_bytes(payload),
                    metrics=UpdateMetrics(240 * 8 * 128, 240, 3.0, 2.0, 10.0))
    return sign_update(update, key), lease


def ingest_once(shapes: dict[str, Any], payloads: list[bytes], signed: list[Any],
                pem: bytes, store: BlobDir) -> tuple[float, list[dict[str, np.ndarray]]]:
    codec, mean = Compression("int8"), get_aggregator("mean", {})
    t0 = time.perf_counter()
    decoded = []
    for payload, (update, lease) in zip(payloads, signed):
        part = store.partial(update.arrays_digest)
        view = memoryview(payload)
        for off in range(0, len(payload), _CHUNK):  # as PutBlob receives it
            part.append(view[off:off + _CHUNK])
        store.commit(part)
        arrays = arrays_from_bytes(store.view(update.arrays_digest))
        verdict = verify(update, arrays, Expected(
            lease=lease, node_id=1, public_key_pem=pem, current_version=0, shapes=shapes,
            max_norm=1000.0, now=time.time(), compression=codec, from_store=True))
        assert verdict.accepted, verdict
        decoded.append(verdict.arrays)
    mean.aggregate(decoded, [1.0] * len(decoded))
    return time.perf_counter() - t0, decoded


def measure(preset: str = "small", k: int = 8, repeats: int = 3) -> dict[str, Any]:
    shapes, payloads = _updates(preset, k)
    key = generate_key()
    signed = [_signed(p, key, i) for i, p in enumerate(payloads)]
    total = sum(len(p) for p in payloads)
    sha, ingest, ours, flower = [], [], [], []
    decoded: list[dict[str, np.ndarray]] = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in payloads:
            hashlib.sha256(p).digest()
        sha.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            s, decoded = ingest_once(shapes, payloads, signed, public_key_pem(key),
                                     BlobDir(Path(tmp)))
        ingest.append(s)
        t = time.perf_counter()
        get_aggregator("mean", {}).aggregate(decoded, [1.0] * k)
        ours.append(time.perf_counter() - t)
        records = [RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in d.items()}),
                               "metrics": MetricRecord({"num-examples": 1})}) for d in decoded]
        t = time.perf_counter()
        aggregate_arrayrecords(records, "num-examples")
        flower.append(time.perf_counter() - t)
    med = statistics.median
    return {
        "preset": preset, "updates": k, "encoded_MB": round(total / 1e6, 1),
        "sha256_MBps": round(total / med(sha) / 1e6, 1),
        "ingest_MBps": round(total / med(ingest) / 1e6, 1),
        "ingest_over_sha256": round(med(sha) / med(ingest), 3),
        "aggregate_s": round(med(ours), 3), "flower_aggregate_s": round(med(flower), 3),
        "aggregate_over_flower": round(med(flower) / med(ours), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    out = measure(a.preset, a.updates, a.repeats)
    if not a.json:
        print(f"ingest {out['ingest_MBps']} MB/s = {out['ingest_over_sha256']}x SHA-256 "
              f"({out['sha256_MBps']} MB/s); aggregation {out['aggregate_over_flower']}x "
              "Flower's speed", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

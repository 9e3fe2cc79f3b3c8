"""The blob data plane's speed: a blob through the coordinator's FetchBlob stream (TLS on
loopback, the real ``CoordinatorService`` and ``node.blobs`` fetcher, into a real cache with its
digest check) against SHA-256 over the same bytes (the ceiling on this machine: every byte
is hashed once on the way in), and, for the same model, the bytes an update takes in each
``[compression]`` scheme.

    python bench/blob_transfer.py                 # 400 MB, 3 repeats, median
    python bench/blob_transfer.py --mb 100 --json

Run on demand; not part of the test suite. The Flower-message comparison of issue 9's
throughput benchmark (21-37 MB/s measured in the Flower notes) is not re-run here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.services.grpc_service import BlobService, serve  # noqa: E402
from coordinator.services.pki import make_pki, tls_files  # noqa: E402
from node.blobs import BlobFetcher, CoordinatorBlobs  # noqa: E402
from protocol import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from protocol.blobstore import BlobDir  # noqa: E402
from protocol.compression import Compression, encode, encoded_bytes  # noqa: E402
from protocol.processes import free_port  # noqa: E402


class _Blobs(BlobService, pb_grpc.CoordinatorServicer):
    def __init__(self, blobs: BlobDir) -> None:
        self.blobs = blobs


def _serve(root: str, port: int, ready: Any) -> None:
    """The coordinator's side, in a process of its own as in a real network (in the
    fetching process it would take the GIL from the fetch); runs until killed."""
    tls = tls_files(Path(root) / "tls")
    server = serve(_Blobs(BlobDir(Path(root) / "coordinator")), "127.0.0.1", port,  # type: ignore[arg-type]
                   tls.server_cert.read_bytes(), tls.server_key.read_bytes())
    ready.set()
    server.wait_for_termination()


def measure(mb: int = 400, repeats: int = 3) -> dict[str, Any]:
    """``mb`` MB of random bytes through FetchBlob (TLS, loopback, from a server process)
    into a checked cache, ``repeats`` times, against SHA-256 over the same bytes; medians."""
    data = np.random.default_rng(0).integers(0, 256, mb * 1_000_000, dtype=np.uint8).tobytes()

    sha = []
    for _ in range(repeats):
        t = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        sha.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory(prefix="atom-blob-bench-") as tmp:
        root = Path(tmp)
        tls = make_pki(root / "tls", ["127.0.0.1"])
        BlobDir(root / "coordinator").put(data, digest)
        port = free_port()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        server = ctx.Process(target=_serve, args=(tmp, port, ready), daemon=True)
        server.start()
        fetch = []
        try:
            if not ready.wait(60):
                raise SystemExit("the blob server did not start")
            creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_cert.read_bytes())
            for i in range(repeats):
                with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                    cache = BlobDir(root / f"node-{i}")
                    fetcher = BlobFetcher(cache, [CoordinatorBlobs(channel)], 1 << 40)
                    t = time.perf_counter()
                    got = fetcher.get(digest)
                    fetch.append(time.perf_counter() - t)
                    assert len(got) == len(data)
                    del got
                    shutil.rmtree(cache.root)  # no repeat writes behind another's dirty pages
        finally:
            server.kill()
            server.join()
    size = len(data) / 1e6
    out = {"blob_mb": size, "blob_MBps": size / statistics.median(fetch),
           "sha256_MBps": size / statistics.median(sha),
           "fetch_s": [round(x, 3) for x in fetch], "sha256_s": [round(x, 3) for x in sha]}
    out["blob_over_sha256"] = out["blob_MBps"] / out["sha256_MBps"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = measure(a.mb, a.repeats)

    # update bytes per scheme for the demo's model (the tiny preset)
    from training.model import PRESETS
    from training.state import init_arrays
    params = init_arrays(PRESETS["tiny"], 0)
    sizes = {s: encoded_bytes(encode(params, Compression(s))) for s in ("none", "int8", "topk")}

    out.update(update_bytes_tiny=sizes,
               update_reduction={s: sizes["none"] / n for s, n in sizes.items()})
    print(f"{out['blob_mb']:.0f} MB blob: FetchBlob over TLS loopback into a checked cache "
          f"{out['blob_MBps']:.0f} MB/s (median of {a.repeats}); SHA-256 alone "
          f"{out['sha256_MBps']:.0f} MB/s; ratio {out['blob_over_sha256']:.2f}", file=sys.stderr)
    print("update bytes (tiny preset): " + ", ".join(
        f"{s} {n / 1e6:.3f} MB ({out['update_reduction'][s]:.1f}x)" for s, n in sizes.items()),
        file=sys.stderr)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()

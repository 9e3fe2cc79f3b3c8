"""The same bytes through a Flower message: the baseline the blob data plane replaces.

A real SuperLink (TLS, SuperNode auth, the coordinator's ``SuperLink`` wrapper) and one
SuperNode on loopback; a bench ServerApp sends one ArrayRecord of random float32 to the
node and its ClientApp sends it back plus one (so nothing deduplicates), as in the Flower
notes' spike. ``flwr_MBps`` counts the bytes moved both ways over the round trip; the
small message before it gives the fixed per-message cost (``small_s``), so
``flwr_marginal_MBps`` is the rate once a message is under way.

The bench's ClientApp comes in the run's FAB: the SuperNode here is plain Flower (default
isolation), not an ATOM node, whose warm worker would refuse that FAB.

    python bench/flower_transfer.py --mb 400 --json

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.services.pki import make_pki  # noqa: E402
from coordinator.services.superlink import SuperLink  # noqa: E402
from protocol.processes import flower_env, free_port, spawn, stop  # noqa: E402
from protocol.signing import generate_key, public_key_pem, save_private_key  # noqa: E402

_SERVER = '''
import json, time
from pathlib import Path
import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


def round_trip(grid, node, x):
    msg = Message(RecordDict({"x": ArrayRecord({"x": Array(x)})}), dst_node_id=node,
                  message_type="train.echo")
    t = time.perf_counter()
    ids = list(grid.push_messages([msg]))
    while not (got := list(grid.pull_messages(ids))):
        time.sleep(0.05)
    assert not got[0].has_error(), got[0].error.reason
    return time.perf_counter() - t


@app.main()
def main(grid, context):
    out, mb = Path(str(context.run_config["out"])), int(context.run_config["mb"])
    end = time.time() + 60
    while not (nodes := list(grid.get_node_ids())) and time.time() < end:
        time.sleep(0.2)
    round_trip(grid, nodes[0], np.zeros(16, np.float32))  # first contact: not measured
    small = round_trip(grid, nodes[0], np.ones(16, np.float32))
    x = np.random.default_rng(0).standard_normal(mb * 250_000).astype(np.float32)
    big = round_trip(grid, nodes[0], x)
    out.write_text(json.dumps({"small_s": small, "big_s": big}))
'''

_CLIENT = '''
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train("echo")
def echo(msg, context):
    x = msg.content["x"]["x"].numpy()
    return Message(RecordDict({"x": ArrayRecord({"x": Array(x + 1)})}), reply_to=msg)
'''

_PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "atom-bench"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "atom"

[tool.flwr.app.components]
serverapp = "bench_server:app"
clientapp = "bench_client:app"

[tool.flwr.app.config]
out = ""
mb = 1
'''


def measure(mb: int = 400, timeout: float = 600.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="atom-flwr-bench-") as tmp:
        root = Path(tmp)
        (root / "logs").mkdir()
        tls = make_pki(root / "tls", ["127.0.0.1"])
        link = SuperLink(root, tls, "127.0.0.1", free_port())
        out = root / "result.json"
        node = None
        try:
            link.start()
            key = generate_key()
            save_private_key(key, root / "node.key")
            link.register_node(public_key_pem(key), "bench")
            node = spawn(["flower-supernode", "--superlink", link.local_address,
                          "--root-certificates", str(tls.ca_cert),
                          "--auth-supernode-private-key", str(root / "node.key"),
                          "--port", str(free_port())],
                         env=flower_env(root / "node-flwr-home"), log=root / "logs" / "node.log")
            link.start_run({"out": str(out), "mb": str(mb)}, files={
                "pyproject.toml": _PYPROJECT.encode(), "bench_server.py": _SERVER.encode(),
                "bench_client.py": _CLIENT.encode()})
            end = time.monotonic() + timeout
            while not out.exists() and time.monotonic() < end:
                if node.poll() is not None or (link.proc and link.proc.poll() is not None):
                    break
                time.sleep(0.5)
            if not out.exists():
                logs = root / "logs"
                raise SystemExit("the Flower transfer did not finish: " + " | ".join(
                    f.read_text(errors="replace")[-400:] for f in logs.glob("*.log")))
            res = json.loads(out.read_text())
        finally:
            stop(node)
            link.stop()
    moved = 2 * mb  # there and back
    return {"flwr_mb": mb, "flwr_MBps": round(moved / res["big_s"], 1),
            "flwr_marginal_MBps": round(moved / max(res["big_s"] - res["small_s"], 1e-9), 1),
            "flwr_round_trip_s": round(res["big_s"], 2),
            "flwr_small_round_trip_s": round(res["small_s"], 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    out = measure(a.mb)
    if not a.json:
        print(f"{a.mb} MB through Flower and back: {out['flwr_round_trip_s']} s, "
              f"{out['flwr_MBps']} MB/s ({out['flwr_marginal_MBps']} MB/s past the "
              f"{out['flwr_small_round_trip_s']} s a small message takes)", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much of a node's time goes into training, and what the network costs: measured.

``network``: runs ``atom-coordinator demo``'s network (a coordinator and N node processes:
Flower, TLS, SuperNode auth, the gRPC data plane, warm workers) and reads the answer off the
ledger and the nodes' worker logs (each lease logs its unix times: received, work started
and ended, replied):

- ``utilization``: per node and overall, time inside training/evaluation steps over the wall
  time of the run (first lease issued to last reply accepted); ``utilization_before_tail``
  the same until the first node's last training step (the run's end aside: see
  ``_before_tail``);
- ``lease_overhead_s``: median per lease of (first step - the moment the node could start:
  the lease's issue or the node's previous reply, whichever is later) + (reply accepted -
  last step), with its parts: ``wait`` (Flower delivering the lease, the SuperNode's poll),
  ``fetch`` (blobs: the data plane, the digest, the cache), ``decode`` (the rest before
  the first step: parse, apply the version's change, build the model), ``upload`` (payload
  by digest, sign), ``reply`` (Flower or the coordinator's service back, its poll: a
  reply's time is taken before it is screened; in lock-step a train reply's checks and the
  round's judging are the next lease's ``wait``, and the coordinator logs them as "round N
  closed: ...").

- ``comm_reduction``: the bytes a synchronous data-parallel run moves per trained token
  (one fp32 gradient ring all-reduce per step, sent + received, W = the nodes) over what a
  node of this run moved per trained token (the model version down + its encoded update
  up, from the blobs the run stored).

``async``: the same network on the asynchronous loop (``[async] enabled``, ``--queue``,
``--async-rounds`` steps), its figures at the top level with ``_async`` appended: the mode
in which nodes never wait at a barrier (its last step filled: ``[async] fill``).

``transfer`` (``bench/blob_transfer.py``, ``bench/flower_transfer.py``): a 400 MB blob
through FetchBlob against the same bytes in a Flower message, and SHA-256 over them.
``ingest`` (``bench/ingest.py``): the coordinator's path for K updates against SHA-256,
its mean against Flower's ``aggregate_arrayrecords``. ``loss`` (``bench/diloco_sim.py``):
final validation loss with int8 and top-k over uncompressed at equal tokens, and over
synchronous data-parallel AdamW on the same batches.

The larger presets need fewer inner steps on this machine: at ``small``'s default H = 240 a
train lease took 247-299 s with three nodes on two cores, and one missed the default 300 s
``deadline_s`` (its lease expired, its node idled a round).

    python bench/throughput.py --json               # everything: ~12 min on 2 cores
    python bench/throughput.py --parts network --preset small --rounds 2 --inner-steps 24
    python bench/throughput.py --parts network --async --queue 1 --rounds 8
    python bench/throughput.py --parts network --set verify_check_processes=2

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benches

from rich.console import Console  # noqa: E402

import blob_transfer  # noqa: E402
import flower_transfer  # noqa: E402
import ingest  # noqa: E402
from coordinator.demo import run_demo  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from training.model import PRESETS  # noqa: E402

_LEASE_LINE = re.compile(r" lease (\{.*\})$")


def node_times(workdir: Path, n: int) -> dict[str, dict[str, float]]:
    """Every lease a node logged, by nonce: its unix times."""
    out: dict[str, dict[str, float]] = {}
    for i in range(n):
        log = workdir / "nodes" / str(i) / "logs" / "worker.log"
        for line in log.read_text(errors="replace").splitlines():
            if m := _LEASE_LINE.search(line):
                rec = json.loads(m.group(1))
                out[rec.pop("nonce")] = rec
    return out


def measure(ledger: Ledger, times: dict[str, dict[str, float]]) -> dict[str, Any]:
    nodes = {n.id: n.name for n in ledger.nodes()}
    updates = {u.lease_id: u for u in ledger.updates()}
    leases = [lease for lease in ledger.leases() if lease.nonce in times
              and lease.id in updates]
    start = min(lease.issued_at for lease in ledger.leases())
    end = max(u.received_at for u in updates.values())
    busy: dict[int, float] = {i: 0.0 for i in nodes}
    parts: dict[str, list[float]] = {k: [] for k in ("wait", "fetch", "decode", "upload",
                                                      "reply")}
    overhead: list[float] = []
    free_at: dict[int, float] = {}  # when each node replied last
    for lease in sorted(leases, key=lambda x: times[x.nonce]["received"]):
        t = times[lease.nonce]
        busy[lease.node_id] += t["work_end"] - t["work_start"]
        ready = max(lease.issued_at, free_at.get(lease.node_id, lease.issued_at))
        got = updates[lease.id].received_at
        wait, before = t["received"] - ready, t["work_start"] - t["received"]
        fetch = min(t.get("fetch_s", before), before)
        upload, reply = t["replied"] - t["work_end"], got - t["replied"]
        for k, v in zip(parts, (wait, fetch, before - fetch, upload, reply)):
            parts[k].append(v)
        overhead.append(wait + before + upload + reply)
        free_at[lease.node_id] = t["replied"]
    wall = end - start
    per_node = {nodes[i]: round(b / wall, 3) for i, b in busy.items()}
    return {
        "utilization": round(sum(busy.values()) / (wall * len(nodes)), 3),
        "utilization_per_node": per_node,
        "utilization_before_tail": _before_tail(leases, times, start),
        "lease_overhead_s": round(statistics.median(overhead), 3),
        "lease_overhead_parts_s": {k: round(statistics.median(v), 3) for k, v in parts.items()},
        "leases": len(leases),
        "wall_s": round(wall, 1),
    }


def _before_tail(leases: list[Any], times: dict[str, dict[str, float]],
                 start: float) -> float:
    """Utilization until the first node's last training step: the window in which every
    node still had training to do. After it, the run's last outer step waits for the
    updates it needs while the nodes not among them sit idle, a tail a run of weeks does
    not have and a bench run of a few steps magnifies."""
    last: dict[int, float] = {}
    for lease in leases:
        if lease.kind == "train":
            last[lease.node_id] = max(last.get(lease.node_id, 0.0),
                                      times[lease.nonce]["work_end"])
    cut = min(last.values(), default=start)
    busy = sum(max(0.0, min(t["work_end"], cut) - t["work_start"])
               for t in (times[lease.nonce] for lease in leases))
    return round(busy / ((cut - start) * len(last)), 3) if cut > start else 0.0


_FETCHED = re.compile(r" fetched (model delta|model|shard) [0-9a-f]{64} \((\d+) bytes\)")


def comm_reduction(workdir: Path, ledger: Ledger, nodes: int) -> dict[str, Any]:
    """DP's bytes per trained token over this run's: what the nodes' worker logs say they
    downloaded of models (whole or as changes) plus the update payloads they uploaded, per
    token they trained (shards are left out on both sides: data-parallel workers read
    their data too)."""
    blobs = workdir / "blobs"
    down = {"model": 0, "model delta": 0, "shard": 0}
    deltas = []
    for i in range(nodes):
        log = workdir / "nodes" / str(i) / "logs" / "worker.log"
        for what, size in _FETCHED.findall(log.read_text(errors="replace")):
            down[what] += int(size)
            if what == "model delta":
                deltas.append(int(size))
    train = [u for u in ledger.updates() if u.steps > 0 and u.verdict == "accepted"]
    up = sum((blobs / u.arrays_digest[:2] / u.arrays_digest).stat().st_size for u in train)
    tokens = sum(u.tokens for u in train)
    v0 = ledger.versions()[0].digest
    fp32 = (blobs / v0[:2] / v0).stat().st_size  # the fp32 arrays (+ a few header bytes)
    step_tokens = statistics.median(u.tokens / u.steps for u in train)  # per worker-step
    dp = 2 * 2 * (nodes - 1) / nodes * fp32 / step_tokens  # ring all-reduce, sent + received
    ours = (down["model"] + down["model delta"] + up) / tokens
    # once every node holds a version, a lease costs one change down and one update up
    per_lease = (statistics.median(deltas) if deltas else fp32) + up / len(train)
    steady = per_lease / (tokens / len(train))
    return {"comm_reduction": round(dp / ours, 1),
            "comm_reduction_steady": round(dp / steady, 1), "model_MB": round(fp32 / 1e6, 3),
            "down_model_MB": round(down["model"] / 1e6, 2),
            "down_delta_MB": round(down["model delta"] / 1e6, 2),
            "down_shard_MB": round(down["shard"] / 1e6, 2), "up_MB": round(up / 1e6, 2),
            "tokens_trained": tokens}


def network(a: argparse.Namespace, asynchronous: bool | None = None) -> dict[str, Any]:
    """The network part: lock-step rounds, or the asynchronous loop (``--async``, or the
    ``async`` part)."""
    asynchronous = a.asynchronous if asynchronous is None else asynchronous
    if a.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="atom-throughput-"))
    else:  # the async part beside the lock-step network's run directory, not in it
        workdir = a.workdir / "async" if asynchronous and not a.asynchronous else a.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {"model_preset": a.preset}
    if a.inner_steps:
        overrides["train_inner_steps"] = a.inner_steps
    if asynchronous:
        overrides.update(async_enabled=True, async_queue=a.queue)
    for item in a.set:  # run.toml settings as section_key=value, e.g. verify_check_processes=2
        key, _, value = item.partition("=")
        try:  # a TOML value (2, -1, 0.5, true, "x"); a bare word is a string
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = value
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    summary, status = run_demo(nodes=a.nodes, rounds=a.rounds, workdir=workdir,
                               console=quiet, overrides=overrides)
    if status != "finished:completed":
        raise SystemExit(f"error: the run ended {status}: {summary.get('error')}")
    with Ledger(summary["ledger"], create=False) as ledger:
        out = measure(ledger, node_times(workdir, a.nodes))
        out.update(comm_reduction(workdir, ledger, a.nodes))
    out.update(preset=a.preset, nodes=a.nodes, rounds=a.rounds, val_loss=summary["val_loss"],
               asynchronous=asynchronous, queue=a.queue if asynchronous else None)
    return out


def losses(a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).with_name("diloco_sim.py")), "--rounds",
           str(a.sim_rounds), "--compression", "none,int8,topk", "--dp-baseline"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    sim = json.loads(res.stdout.strip().splitlines()[-1])
    ratios = sim["loss_ratio_vs_none"]
    return {"loss_ratio_int8": ratios["int8"], "loss_ratio_topk": ratios["topk"],
            "loss_ratio_vs_dp": sim["loss_ratio_vs_dp"]["none"],
            "loss_ratio_vs_dp_int8": sim["loss_ratio_vs_dp"]["int8"],
            "sim_final_val": sim["final_val"], "sim_dp_val_curve": sim["dp_val_curve"]}


PARTS = ("network", "async", "transfer", "ingest", "loss")
# what the ``async`` part reports at the top level, beside the (lock-step) network's
_ASYNC_TOP = ("utilization", "utilization_per_node", "utilization_before_tail",
              "lease_overhead_s", "lease_overhead_parts_s", "wall_s", "tokens_trained")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--inner-steps", type=int, help="override the run's default")
    p.add_argument("--async", dest="asynchronous", action="store_true",
                   help="the asynchronous loop ([async] enabled; ROUNDS outer steps)")
    p.add_argument("--async-rounds", type=int, default=8,
                   help="outer steps of the async part (its end is a larger share of a short run)")
    p.add_argument("--queue", type=int, default=0,
                   help="asynchronous: train leases queued on each node ([async] queue)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="SECTION_KEY=VALUE",
                   help="a run.toml setting of the network runs, e.g. verify_check_processes=2")
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    p.add_argument("--blob-mb", type=int, default=400)
    p.add_argument("--ingest-preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--sim-rounds", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    parts = [x for x in a.parts.split(",") if x]
    if bad := [x for x in a.set if "=" not in x]:
        p.error(f"--set {bad[0]!r}: expected SECTION_KEY=VALUE")
    if bad := sorted(set(parts) - set(PARTS)):
        p.error(f"unknown part {bad[0]!r}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    t0 = time.monotonic()
    out: dict[str, Any] = {}
    if "network" in parts:
        out.update(network(a))
        _say(a, f"utilization {out['utilization']:.2f} (per node "
             + ", ".join(f"{k} {v:.2f}" for k, v in out["utilization_per_node"].items())
             + f"); lease overhead {out['lease_overhead_s']:.2f} s median "
             + str(out["lease_overhead_parts_s"]) + f"; comm reduction "
             f"{out['comm_reduction']:.0f}x")
    if "async" in parts:
        res = network(argparse.Namespace(**{**vars(a), "rounds": a.async_rounds}), True)
        out.update({f"{k}_async": res[k] for k in _ASYNC_TOP}, asynchronous_run=res)
        _say(a, f"asynchronous ({a.async_rounds} steps, queue {a.queue}): utilization "
             f"{res['utilization']:.3f}, lease overhead {res['lease_overhead_s']:.2f} s")
    if "transfer" in parts:
        blob = blob_transfer.measure(a.blob_mb)
        out.update({k: round(blob[k], 1) for k in ("blob_MBps", "sha256_MBps")})
        out.update(flower_transfer.measure(a.blob_mb))
        out["blob_over_flwr"] = round(out["blob_MBps"] / out["flwr_MBps"], 1)
        _say(a, f"{a.blob_mb} MB: FetchBlob {out['blob_MBps']} MB/s, Flower "
             f"{out['flwr_MBps']} MB/s ({out['blob_over_flwr']}x), SHA-256 "
             f"{out['sha256_MBps']} MB/s")
    if "ingest" in parts:
        ing = ingest.measure(a.ingest_preset)
        out.update(ingest_over_sha256=ing["ingest_over_sha256"],
                   aggregate_over_flower=ing["aggregate_over_flower"], ingest=ing)
        _say(a, f"ingest {ing['ingest_over_sha256']}x SHA-256, aggregation "
             f"{ing['aggregate_over_flower']}x Flower's speed ({a.ingest_preset})")
    if "loss" in parts:
        out.update(losses(a))
        _say(a, f"final loss int8/none {out['loss_ratio_int8']}, topk/none "
             f"{out['loss_ratio_topk']}, DiLoCo/data-parallel {out['loss_ratio_vs_dp']}")
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0


def _say(a: argparse.Namespace, text: str) -> None:
    if not a.json:
        print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""A mixed fleet through the real run loop: nodes of 1x, 2x and 4x speed, in simulated time.

The coordinator's real run loop, verifier, judge and ledger drive in-process nodes of the fake
network (``tests/unit/fake_network.py``) that train for real but take *simulated* time: a node
of speed s spends ``tokens / s`` fake seconds on a train lease (a third of that per token on
an evaluation), one message after another, and reports that time as its ``wall_s``. The fake
clock moves only when the loop waits, so the coordinator's own work costs no simulated time
(on a real network it adds to every round's barrier).

Two ways to run the same fleet for the same number of rounds:

- ``fixed``: every train lease is ``inner_steps`` (the lock-step loop as the demo runs it);
- ``sized``: ``[train] target_lease_s`` sizes each lease to its node's measured speed
  (``coordinator/run/sizing.py``; a node's first lease calibrates).

Reported per mode: simulated wall time, each node's utilization (fake seconds of work over
the run's wall), accepted train tokens per simulated second, final validation loss; and the
ratios sized/fixed. The asynchronous loop (issue 10, not built yet) is the next column.

    python bench/fleet.py                 # speeds 1,2,4, 6 rounds
    python bench/fleet.py --speeds 1,1,4 --rounds 8 --json
    python bench/fleet.py --speeds 1,2,4,2 --leave 20,45   # the 4th node is off for 25 s

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]  # the fake network lives with the tests

from loop_world import build_test_corpus, make_net  # noqa: E402

from coordinator.ledger import Ledger  # noqa: E402

BASE_SPEED = 100.0  # trained tokens per fake second of a 1x node
STEP_TOKENS = 2 * 32  # the test run's batch_size x seq_len


def run(mode: str, speeds: list[float], rounds: int, inner_steps: int, tmp: Path,
        corpus: Any, leave: tuple[float, float] | None = None) -> dict[str, Any]:
    lease_s = inner_steps * STEP_TOKENS / BASE_SPEED  # what the 1x node's fixed lease takes
    train = f"inner_steps = {inner_steps}\ndeadline_s = {20 * lease_s:g}\n"
    if mode == "sized":
        train += (f"target_lease_s = {lease_s:g}\nmin_inner_steps = 2\n"
                  f"max_inner_steps = {int(inner_steps * max(speeds)) + 1}\n"
                  f"deadline_slack_s = {lease_s:g}\n")
    net = make_net(tmp, corpus, ["honest"] * len(speeds), rounds=rounds, train=train,
                   verify="spot_check_rate = 0\neval_quorum_rate = 0")
    for node, s in zip(net.nodes, speeds):
        node.speed = s * BASE_SPEED
    start = net.clock()
    for node in net.nodes:
        node.free_at = start
    if leave is not None:  # the last node's machine is off for a while, losing its lease
        net.nodes[-1].away = (start + leave[0], start + leave[1])
    net.run()
    wall = net.clock() - start
    out = _summary(net.ledger, wall, net.nodes)
    net.ledger.close()
    return out


def _summary(ledger: Ledger, wall: float, nodes: list[Any]) -> dict[str, Any]:
    kind = {x.id: x.kind for x in ledger.leases()}
    tokens = sum(u.tokens for u in ledger.updates()
                 if u.verdict == "accepted" and kind[u.lease_id] == "train")
    versions = ledger.versions()
    util = {n.name.split("-")[1]: round(min(1.0, n.busy_s / wall), 3) for n in nodes}
    return {"wall_s": round(wall, 1), "utilization": util,
            "utilization_min": min(util.values()), "train_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "val_loss": versions[-1].val_loss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speeds", default="1,2,4", help="node speeds, multiples of the slowest")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--inner-steps", type=int, default=12, help="fixed lease (the 1x node's)")
    p.add_argument("--leave", metavar="FROM,UNTIL",
                   help="the last node is off from FROM to UNTIL simulated seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    leave = tuple(float(x) for x in a.leave.split(",")) if a.leave else None
    speeds = [float(x) for x in a.speeds.split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"speeds": speeds, "rounds": a.rounds, "leave": leave}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = build_test_corpus(root / "corpus")
        for mode in ("fixed", "sized"):
            (root / mode).mkdir()
            out[mode] = run(mode, speeds, a.rounds, a.inner_steps, root / mode, corpus,
                            leave)  # type: ignore[arg-type]
            m = out[mode]
            print(f"{mode:5}: wall {m['wall_s']} s, utilization {m['utilization']}, "
                  f"{m['tokens_per_s']} tokens/s, val loss {m['val_loss']:.4f}", file=sys.stderr)
    f, s = out["fixed"], out["sized"]
    out["throughput_ratio"] = round(s["tokens_per_s"] / f["tokens_per_s"], 3)
    out["utilization_min_fixed"], out["utilization_min_sized"] = (f["utilization_min"],
                                                                  s["utilization_min"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

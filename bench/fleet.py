"""A mixed fleet through the real run loop: nodes of 1x, 2x and 4x speed, in simulated time.

The coordinator's real run loop, verifier, judge and ledger drive in-process nodes of the fake
network (``tests/unit/fake_network.py``) that train for real but take *simulated* time: a node
of speed s spends ``tokens / s`` fake seconds on a train lease (a third of that per token on
an evaluation), one message after another, and reports that time as its ``wall_s``. The fake
clock moves only when the loop waits, so the coordinator's own work costs no simulated time
(on a real network it adds to every round's barrier).

Three ways to run the same fleet:

- ``fixed``: lock-step rounds, every train lease ``inner_steps`` (the loop as the demo runs it);
- ``sized``: lock-step rounds, ``[train] target_lease_s`` sizing each lease to its node's
  measured speed (``coordinator/run/sizing.py``; a node's first lease calibrates);
- ``async``: the asynchronous loop (``coordinator/run/async_loop.py``) with sized leases, for
  twice as many outer steps (``--async-steps``), K = the nodes online.

Reported per mode: simulated wall time, each node's utilization (fake seconds of work over
the run's wall), accepted train tokens per simulated second, final validation loss and the
curve (seconds, tokens, val loss per version). The goal's figures compare ``async`` with
``fixed``: ``speedup`` (simulated time until a version's validation loss is at most fixed's
final one, against fixed's time to that final version), ``loss_ratio`` (async's loss at
fixed's total tokens, interpolated between versions, over fixed's final loss),
``utilization_min`` (async's least busy node); ``speedup_vs_sized`` and
``loss_ratio_vs_sized`` the same against ``sized``. ``chaos_trials`` / ``chaos_violations``
come from killing the asynchronous loop at random ledger writes (``tests/unit/chaos.py``).

    python bench/fleet.py                 # speeds 1,2,4, 24 rounds, 48 async steps
    python bench/fleet.py --speeds 1,1,4 --rounds 12 --json
    python bench/fleet.py --speeds 1,2,4,2 --leave 20,45   # the 4th node is off for 25 s
    python bench/fleet.py --async-opts "queue = 1"         # [async] keys for the async run

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]  # the fake network lives with the tests

from chaos import ASYNC, run_chaos  # noqa: E402
from loop_world import build_test_corpus, make_net  # noqa: E402

from coordinator.ledger import Ledger  # noqa: E402

BASE_SPEED = 100.0  # trained tokens per fake second of a 1x node
STEP_TOKENS = 2 * 32  # the test run's batch_size x seq_len
OUTER = os.environ.get("FLEET_OUTER", "lr = 0.7\nmomentum = 0.9").replace(";", "\n")


def run(mode: str, speeds: list[float], rounds: int, inner_steps: int, tmp: Path,
        corpus: Any, leave: tuple[float, float] | None = None,
        async_: str = "") -> dict[str, Any]:
    lease_s = inner_steps * STEP_TOKENS / BASE_SPEED  # what the 1x node's fixed lease takes
    train = f"inner_steps = {inner_steps}\ndeadline_s = {20 * lease_s:g}\n"
    if mode in ("sized", "async"):
        train += (f"target_lease_s = {lease_s:g}\nmin_inner_steps = 2\n"
                  f"max_inner_steps = {int(inner_steps * max(speeds)) + 1}\n"
                  f"deadline_slack_s = {lease_s:g}\n")
    extra = f"[async]\nenabled = true\n{async_}" if mode.startswith("async") else ""
    net = make_net(tmp, corpus, ["honest"] * len(speeds), rounds=rounds, train=train,
                   verify="spot_check_rate = 0\neval_quorum_rate = 0", extra=extra,
                   outer=OUTER)
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
    out["curve"] = _curve(net.ledger, start)
    net.ledger.close()
    return out


def _curve(ledger: Ledger, start: float) -> list[tuple[float, int, float | None]]:
    """Per version: (simulated seconds since the start, train tokens so far, val loss)."""
    out, tokens = [], 0
    for v in ledger.versions():
        tokens += v.tokens
        out.append((round(max(0.0, v.created_at - start), 2), tokens, v.val_loss))
    return out


def _loss_at(curve: list, tokens: int) -> float | None:
    """The val loss of the first version with at least ``tokens`` train tokens, linearly
    interpolated with the version before it (a version is a step: tokens come in lumps)."""
    prev = None
    for t, n, loss in curve:
        if loss is None:
            continue
        if n >= tokens:
            if prev is None or n == prev[0]:
                return loss
            f = (tokens - prev[0]) / (n - prev[0])
            return prev[1] + f * (loss - prev[1])
        prev = (n, loss)
    return None


def _time_to(curve: list, loss: float) -> float | None:
    """Simulated seconds until a version's val loss is at most ``loss``."""
    return next((t for t, _, x in curve if x is not None and x <= loss), None)


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
    p.add_argument("--rounds", type=int, default=24, help="lock-step rounds")
    p.add_argument("--inner-steps", type=int, default=12, help="fixed lease (the 1x node's)")
    p.add_argument("--leave", metavar="FROM,UNTIL",
                   help="the last node is off from FROM to UNTIL simulated seconds")
    p.add_argument("--async-steps", type=int, default=0,
                   help="outer steps of the asynchronous run (default: twice --rounds)")
    p.add_argument("--async-opts", default="", help="[async] keys, ';'-separated, e.g. "
                   "'buffer = 3;staleness_power = 1'")
    p.add_argument("--chaos-trials", type=int, default=8,
                   help="kill the asynchronous loop at this many ledger writes (0: skip)")
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
        async_opts = a.async_opts.replace(";", "\n") + "\n"
        for mode in ("fixed", "sized", "async"):
            (root / mode).mkdir()
            rounds = a.async_steps or 2 * a.rounds if mode == "async" else a.rounds
            out[mode] = run(mode, speeds, rounds, a.inner_steps, root / mode, corpus,
                            leave, async_opts)  # type: ignore[arg-type]
            m = out[mode]
            print(f"{mode:5}: wall {m['wall_s']} s, utilization {m['utilization']}, "
                  f"{m['tokens_per_s']} tokens/s, val loss {m['val_loss']:.4f}", file=sys.stderr)
        if a.chaos_trials:  # the asynchronous loop killed at random ledger writes
            (root / "chaos").mkdir()
            chaos = run_chaos(root / "chaos", corpus, 3, a.chaos_trials, seed=1, extra=ASYNC,
                              progress=False)
            out["chaos_trials"], out["chaos_violations"] = (chaos["chaos_trials"],
                                                            chaos["chaos_violations"])
            print(f"chaos: {out['chaos_trials']} kills of the asynchronous loop, "
                  f"{out['chaos_violations']} with violations", file=sys.stderr)
    f, s, x = out["fixed"], out["sized"], out["async"]
    out["throughput_ratio"] = round(s["tokens_per_s"] / f["tokens_per_s"], 3)
    out["utilization_min_fixed"], out["utilization_min_sized"] = (f["utilization_min"],
                                                                  s["utilization_min"])
    # the goal's figures: async against the lock-step rounds (fixed leases, as the demo runs)
    target, tokens = f["val_loss"], f["train_tokens"]
    reach_f, reach_x = f["curve"][-1][0], _time_to(x["curve"], target)
    out["speedup"] = round(reach_f / reach_x, 3) if reach_x else None
    out["speedup_vs_sized"] = (round(s["curve"][-1][0] / _time_to(x["curve"], s["val_loss"]), 3)
                               if _time_to(x["curve"], s["val_loss"]) else None)
    at = _loss_at(x["curve"], tokens)
    out["loss_ratio"] = round(at / target, 4) if at is not None else None
    at_sized = _loss_at(x["curve"], s["train_tokens"])
    out["loss_ratio_vs_sized"] = (round(at_sized / s["val_loss"], 4)
                                  if at_sized is not None else None)
    out["utilization_min"] = x["utilization_min"]
    print(f"async: reaches lock-step's final val loss {target:.4f} after "
          f"{reach_x} s (lock-step: {reach_f} s): {out['speedup']}x; val loss at lock-step's "
          f"{tokens} tokens {at}: ratio {out['loss_ratio']}", file=sys.stderr)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Simulate the CPU demo in one process: W workers x R DiLoCo rounds on the stdlib corpus.

Each round every worker trains its own shard (distinct shards throughout) for H inner
steps from the current global weights; the token-weighted mean of their pseudo-gradients
goes through a Nesterov-momentum SGD outer step; the validation loss is printed.

    python bench/diloco_sim.py                       # workers one after another, 1 thread each
    python bench/diloco_sim.py --parallel            # workers as concurrent processes (the demo's
                                                     # contention: 3 x 1 thread on a 2-core box)
    python bench/diloco_sim.py --compression none,int8,topk   # one run per update encoding,
                                                     # final val loss of each over none's
    python bench/diloco_sim.py --dp-baseline         # and synchronous data-parallel AdamW on
                                                     # the same batches (W x B per step)

Each pseudo-gradient goes through ``protocol.compression`` as a node would send it (top-k
with ``--error-feedback``: each worker carries what it dropped into its next round).

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.config import RunConfig  # noqa: E402
from protocol.compression import (  # noqa: E402
    Compression, ErrorFeedback, decode, encoded_bytes,
)
from training.corpus import build_stdlib_corpus  # noqa: E402
from training.device import set_threads  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.inner import train_inner  # noqa: E402
from training.model import PRESETS  # noqa: E402
from training.shards import make_shards  # noqa: E402
from training.state import init_arrays  # noqa: E402


def parse_args() -> argparse.Namespace:
    d = RunConfig()  # the one source of defaults: what the demo runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=d.model.preset, choices=sorted(PRESETS))
    p.add_argument("--n-layer", type=int, help="override the preset")
    p.add_argument("--n-embd", type=int, help="override the preset")
    p.add_argument("--n-head", type=int, help="override the preset")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inner-steps", type=int, default=d.train.inner_steps)
    p.add_argument("--batch-size", type=int, default=d.train.batch_size)
    p.add_argument("--seq-len", type=int, default=d.train.seq_len)
    p.add_argument("--lr", type=float, default=d.train.lr)
    p.add_argument("--weight-decay", type=float, default=d.train.weight_decay)
    p.add_argument("--outer-lr", type=float, default=d.outer.lr)
    p.add_argument("--momentum", type=float, default=d.outer.momentum)
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens)
    p.add_argument("--val-tokens", type=int, default=d.data.eval_tokens, help="validation tokens scored")
    p.add_argument("--max-bytes", type=int, default=d.data.max_bytes)
    p.add_argument("--corpus-dir", default="/tmp/atom-bench-corpus")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--parallel", action="store_true", help="run the workers as concurrent processes")
    p.add_argument("--shard-order", choices=["shuffled", "sequential"], default="shuffled",
                   help="shuffled: a seeded permutation, so a round's shards come from all over the "
                   "corpus (sorted stdlib files make neighbouring shards alike)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default="none",
                   help="comma-separated update encodings to compare: none, int8, topk")
    p.add_argument("--topk-fraction", type=float, default=0.01)
    p.add_argument("--error-feedback", action="store_true", help="topk: carry what was dropped")
    p.add_argument("--broadcast", default="none", choices=["none", "int8"],
                   help="how new versions reach the workers: whole (none), or as the previous "
                        "version + the int8-encoded change, what is lost carried into the next")
    p.add_argument("--dp-baseline", action="store_true",
                   help="also train synchronous data-parallel on the same tokens: every step "
                        "one AdamW step on all W workers' batches of that step together")
    p.add_argument("--keep-inner-state", action="store_true",
                   help="each worker keeps its AdamW state across rounds (as DiLoCo's do); "
                        "runs once without and once with, and prints both (serial only)")
    return p.parse_args()


def _work(job: dict) -> dict:
    set_threads(job.pop("threads"))
    cpu = time.process_time()
    r = train_inner(**job)
    # CPU seconds do not depend on what else runs: x1.5 is the ideal wall for 3 on 2 cores.
    return {"pg": r.pseudo_grad, "tokens": r.tokens, "before": r.loss_before,
            "after": r.loss_after, "wall_s": r.wall_s, "cpu_s": time.process_time() - cpu,
            "opt_state": r.opt_state}


def outer_step(params, avg, buf, lr: float, momentum: float) -> None:
    """torch.optim.SGD(nesterov=True, dampening=0) applied to the averaged pseudo-gradient."""
    for name, g in avg.items():
        buf[name] = g.copy() if name not in buf else momentum * buf[name] + g
        params[name] -= lr * (g + momentum * buf[name])


def simulate(a: argparse.Namespace, cfg, shards, toks, val, codec: Compression,  # type: ignore[no-untyped-def]
             keep_state: bool = False):
    """R rounds of W workers from the same start; each update through ``codec``; with
    ``keep_state`` each worker starts its AdamW from where its previous round ended."""
    params = init_arrays(cfg, a.seed)
    n_params = sum(v.size for v in params.values())
    print(f"{codec.scheme}: model {a.preset} {asdict(cfg)} params={n_params / 1e6:.2f}M")
    feedback = [ErrorFeedback() for _ in range(a.workers)]  # one per worker, across rounds
    down = ErrorFeedback()  # the coordinator's, for a compressed broadcast
    broadcast = Compression(a.broadcast)
    opt_states: list = [None] * a.workers
    shapes = {k: (v.shape, "<f4") for k, v in params.items()}
    sent = 0

    def val_loss() -> tuple[float, float]:
        t = time.perf_counter()
        r = evaluate(params, cfg, val, seq_len=a.seq_len, batch_size=32, device="cpu")
        return r.mean_loss, time.perf_counter() - t

    v0, ev_s = val_loss()
    curve, shard_s, shard_cpu = [v0], [], []
    print(f"round 0  val {v0:.3f}  (eval {ev_s:.1f}s)")
    buf: dict[str, np.ndarray] = {}
    pool = mp.get_context("spawn").Pool(a.workers) if a.parallel else None
    try:
        for rnd in range(a.rounds):
            jobs = [
                dict(base=params, cfg=cfg, tokens=np.array(toks[s.start : s.end]),
                     steps=a.inner_steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                     weight_decay=a.weight_decay, seed=a.seed * 1000 + s.shard_id,
                     device="cpu", threads=a.threads, opt_state=opt_states[w],
                     keep_opt_state=keep_state)
                for w, s in enumerate(shards[rnd * a.workers : (rnd + 1) * a.workers])
            ]
            t = time.perf_counter()
            res = pool.map(_work, jobs) if pool else [_work(j) for j in jobs]
            round_s = time.perf_counter() - t
            opt_states = [r["opt_state"] for r in res]
            for w, r in enumerate(res):  # what the coordinator gets: the decoded encoding
                enc = feedback[w].encode(r["pg"], codec)
                sent += encoded_bytes(enc)
                r["pg"] = decode(enc, codec, shapes, float("inf"))
            total = sum(r["tokens"] for r in res)
            avg = {k: sum(r["pg"][k] * (r["tokens"] / total) for r in res) for k in params}
            if broadcast.scheme == "none":
                outer_step(params, avg, buf, a.outer_lr, a.momentum)
            else:  # nodes get the version as base + the encoded change (residual kept here)
                new = {k: v.copy() for k, v in params.items()}
                outer_step(new, avg, buf, a.outer_lr, a.momentum)
                enc = down.encode({k: new[k] - params[k] for k in params}, broadcast)
                delta = decode(enc, broadcast, shapes, float("inf"))
                for k in params:
                    params[k] = params[k] + delta[k]
            v, ev_s = val_loss()
            curve.append(v)
            shard_s += [r["wall_s"] for r in res]
            shard_cpu += [r["cpu_s"] for r in res]
            inner = " ".join(
            f"{r['before']:.2f}->{r['after']:.2f}/{r['wall_s']:.1f}s({r['cpu_s']:.1f} cpu)" for r in res
        )
            print(f"round {rnd + 1}  val {v:.3f}  (eval {ev_s:.1f}s)  round {round_s:.1f}s  "
                  f"inner loss/wall(cpu): {inner}")
    finally:
        if pool:
            pool.close()
            pool.join()
    return curve, shard_s, shard_cpu, sent, n_params


def data_parallel(a: argparse.Namespace, cfg, shards, toks, val) -> list[float]:  # type: ignore[no-untyped-def]
    """What DiLoCo is measured against: one model, one AdamW step per inner step on the
    batches all W workers draw at that step (the same generators, seeds and shards as
    ``train_inner``), i.e. the same tokens at the same global batch; the validation loss
    after each round's H steps."""
    import torch

    from training.inner import GRAD_CLIP, inner_optimizer, sample_batch
    from training.state import arrays_to_model, model_to_arrays

    model = arrays_to_model(init_arrays(cfg, a.seed), cfg, "cpu")
    model.train()
    opt = inner_optimizer(model, a.lr, a.weight_decay, torch.device("cpu"))
    curve = [evaluate(init_arrays(cfg, a.seed), cfg, val, seq_len=a.seq_len, batch_size=32,
                      device="cpu").mean_loss]
    torch.manual_seed(a.seed)
    for rnd in range(a.rounds):
        round_shards = shards[rnd * a.workers:(rnd + 1) * a.workers]
        data = [torch.from_numpy(np.array(toks[s.start:s.end], dtype=np.int64))
                for s in round_shards]
        gens = [torch.Generator().manual_seed(a.seed * 1000 + s.shard_id) for s in round_shards]
        for _ in range(a.inner_steps):
            batches = [sample_batch(d, a.batch_size, a.seq_len, g) for d, g in zip(data, gens)]
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        curve.append(evaluate(model_to_arrays(model), cfg, val, seq_len=a.seq_len,
                              batch_size=32, device="cpu").mean_loss)
        print(f"data-parallel round {rnd + 1}  val {curve[-1]:.3f}")
    return curve


def main() -> None:
    a = parse_args()
    set_threads(a.threads)
    over = {k: v for k, v in (("n_layer", a.n_layer), ("n_embd", a.n_embd), ("n_head", a.n_head)) if v}
    cfg = replace(PRESETS[a.preset], **over)
    info = build_stdlib_corpus(a.corpus_dir, max_bytes=a.max_bytes, val_every=RunConfig().data.val_every)
    toks = info.tokens()
    shards = make_shards(*info.train_range, a.shard_tokens)
    need = a.rounds * a.workers
    if len(shards) < need:
        raise SystemExit(f"only {len(shards)} shards; need {need} (raise --max-bytes)")
    if a.shard_order == "shuffled":
        shards = [shards[i] for i in np.random.default_rng(a.seed).permutation(len(shards))]
    val = np.array(toks[info.val_range[0] : info.val_range[0] + a.val_tokens])

    schemes = [x for x in a.compression.split(",") if x]
    if a.keep_inner_state and a.parallel:
        raise SystemExit("--keep-inner-state runs the workers one after another")
    finals: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    runs = [(s, False) for s in schemes] + [(s, True) for s in schemes if a.keep_inner_state]
    for scheme, keep in runs:
        codec = Compression(scheme, fraction=a.topk_fraction, feedback=a.error_feedback)
        curve, shard_s, shard_cpu, sent, n_params = simulate(a, cfg, shards, toks, val, codec,
                                                             keep)
        name = f"{scheme}+inner_state" if keep else scheme
        finals[name], curves[name] = curve[-1], curve
        print(f"{name}: final val {curve[-1]:.4f}, {sent / a.rounds / a.workers / 1e6:.3f} MB "
              "per update")
    dp = data_parallel(a, cfg, shards, toks, val) if a.dp_baseline else None
    print(f"corpus {info.n_tokens} tokens, {len(shards)} train shards of ~{a.shard_tokens}; "
          f"val scored on {val.size} tokens")
    base = finals.get("none")
    ratios = {k: round(v / base, 4) for k, v in finals.items()} if base else {}
    if ratios:
        print("final val loss over none's: " + ", ".join(f"{k} {v:.4f}" for k, v in ratios.items()))
    print(json.dumps({
        "preset": a.preset, "model": asdict(cfg), "params": n_params, "parallel": a.parallel,
        "inner_steps": a.inner_steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "lr": a.lr, "outer_lr": a.outer_lr, "momentum": a.momentum, "shard_tokens": a.shard_tokens,
        "val_curve": [round(x, 4) for x in curve],
        "val_curves": {k: [round(x, 4) for x in c] for k, c in curves.items()},
        "final_val": finals, "loss_ratio_vs_none": ratios, "topk_fraction": a.topk_fraction,
        "error_feedback": a.error_feedback,
        "dp_val_curve": [round(x, 4) for x in dp] if dp else None,
        "loss_ratio_vs_dp": ({k: round(v / dp[-1], 4) for k, v in finals.items()}
                             if dp else None),
        "shard_s_mean": round(float(np.mean(shard_s)), 2), "shard_s_max": round(max(shard_s), 2),
        "shard_cpu_s_mean": round(float(np.mean(shard_cpu)), 2),
    }))


if __name__ == "__main__":
    main()

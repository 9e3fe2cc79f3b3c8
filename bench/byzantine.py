"""Byzantine benchmark: honest nodes and attackers against the real coordinator code.

Every run drives the real ``coordinator.run.loop.RunLoop`` (verifier, judging, round checks,
spot checks, aggregator, outer step, ledger, credits) over the in-process fake network of
``tests/unit/fake_network.py``: 8 nodes, of which 2 (25%) attack, one run per attack kind,
each with the default ``[verify]``/``[aggregation]`` policy ("defended") and again with the
round-level layers off and ``method = "mean"`` ("undefended": ``norm_factor = 0``,
``reject_duplicates = false``, ``usefulness_tokens = 0``, ``spot_check_rate = 0``). The
per-reply checks of ``coordinator.verify.reply`` (signature, lease binding, digest, shapes,
finite values, the static norm cap, metrics) cannot be turned off: wrong_key, nan and
replay are rejected in both. Undefended also turns off the base check
(``base_loss_tolerance = 0``) and the eval checks (``eval_check_windows = 0``,
``eval_quorum_rate = 0``). Attackers misbehave in train work only and evaluate honestly,
except the two eval liars, which train honestly and lie in every eval reply.

    sign_flip   the honest update times -10
    noise       honest + Gaussian noise of 20 x its RMS per value
    free_rider  zero update, no training, full tokens claimed
    replay      its previous reply sent again, byte for byte
    reuse       its previous update re-signed for the new lease (a replay that passes the
                lease binding)
    copy        an honest node's update of the same round, as its own
    wrong_key   honest work signed with another key
    nan         a NaN in the update, digest and signature made over it
    stale       honest work from the model of its previous lease, claimed for the current one
                with that work's own metrics (a node that missed a model update)
    stale_forged  as stale, reporting the loss the *current* base has on the first batch: an
                attacker who knows the base check. Adaptive: reported apart, not in the
                headline attacker credits, as metric checks cannot stop it by design; only
                spot checks (and the trust they lower) can
    partial     half the lease's inner steps, the full count claimed (adaptive, too: it
                starts from the right base, and half the training still helps)
    eval_lie    every eval window a flat 0.25 nats per token, the total made to match
    eval_subtle every eval window 3% below the honest loss, the total made to match

Reported per kind: the final validation loss over an all-honest run's (same seed, same
policy), the attacks rejected / submitted (an attack = a reply an attacker misbehaved in:
replay, reuse and stale have nothing to attack with in their first round and work honestly
there, which is not counted), the credits the attacks earned, net of the penalties lost spot
and eval checks cost (``[credits] mismatch_penalty``); the largest relative gap between a
version's published validation loss and the all-honest run's (``val_loss_error``) and
between it and that version's true loss on the same ranges (``published_error``, which
isolates the lie from the run taking another path); and the cost of verification per update
against the node's training time.

    python bench/byzantine.py                 # ~2-4 min on 2 cores
    python bench/byzantine.py --json          # ... and one JSON object, last
    python bench/byzantine.py --kinds noise,stale --rounds 6

Run on demand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]  # the fake network lives with the tests

from fake_network import FakeClock, FakeTransport, enroll  # noqa: E402

from coordinator.config import parse_config  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from coordinator.run.loop import RunLoop  # noqa: E402
from coordinator.run.model_store import ModelStore  # noqa: E402
from protocol.blobstore import BlobDir  # noqa: E402
from training.corpus import build_stdlib_corpus  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.inner import first_batch_loss, train_inner  # noqa: E402

KINDS = ("sign_flip", "noise", "free_rider", "replay", "reuse", "copy", "wrong_key", "nan",
         "stale", "stale_forged", "partial", "eval_lie", "eval_subtle")
ADAPTIVE = ("stale_forged", "partial")  # built to pass the cheap checks; see the module docstring
UNDEFENDED = """norm_factor = 0
reject_duplicates = false
usefulness_tokens = 0
spot_check_rate = 0
base_loss_tolerance = 0
eval_check_windows = 0
eval_quorum_rate = 0
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(KINDS), help="attack kinds, comma-separated")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--attackers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-tokens", type=int, default=32_768, help="tokens of the final score")
    p.add_argument("--corpus-dir", default=str(Path(tempfile.gettempdir()) / "atom-bench-byz"))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-cost-probe", action="store_true",
                   help="skip timing verification against one shard of the default config")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p.parse_args()


def run_toml(a: argparse.Namespace, defended: bool) -> str:
    # the tiny preset made tinier and a short inner loop: a whole run takes seconds
    return f"""
[run]
id = "byzantine"
rounds = {a.rounds}
min_nodes = 1
wait_for_nodes_s = 0

[model]
preset = "tiny"
n_layer = 1
n_head = 2
n_embd = 64
block_size = 64

[data]
eval_tokens = 2048

[train]
inner_steps = {a.inner_steps}
batch_size = 8
seq_len = 64
lr = 3e-3
deadline_s = 60

[aggregation]
method = "mean"

[verify]
{"" if defended else UNDEFENDED}
"""


@dataclass
class RunResult:
    final_loss: float
    submitted: int = 0  # attackers' replies they misbehaved in
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    attacker_credits: float = 0.0  # for (and charged against) those replies
    val_loss: list[float | None] = field(default_factory=list)  # published, per version
    true_val_loss: list[float] = field(default_factory=list)  # the same ranges, recomputed
    honest_rejected: int = 0
    honest_submitted: int = 0
    verify_s_per_update: float = 0.0
    train_s_per_update: float = 0.0
    recomputes: int = 0
    seconds: float = 0.0


def run_once(a: argparse.Namespace, corpus, kind: str | None, defended: bool) -> RunResult:
    """One run: ``a.nodes`` nodes, the last ``a.attackers`` of them ``kind`` (None: none)."""
    t0 = time.perf_counter()
    specs = ["honest"] * (a.nodes - (a.attackers if kind else 0))
    specs += [kind] * (a.attackers if kind else 0)
    with tempfile.TemporaryDirectory(prefix="atom-byz-") as tmp:
        cfg = parse_config(run_toml(a, defended), tmp)
        with Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}") as ledger:
            nodes = enroll(ledger, specs)
            clock = FakeClock(limit_s=24 * 3600.0)
            store = ModelStore.open(Path(tmp) / "checkpoints", cfg, ledger, seed=a.seed,
                                    corpus=corpus)
            blobs = BlobDir(Path(tmp) / "blobs")
            loop = RunLoop(cfg, ledger, FakeTransport(nodes, clock, blobs), store, corpus,
                           blobs=blobs, clock=clock,
                           sleep=clock.sleep, rng=random.Random(a.seed))
            loop.run()
            lo, hi = corpus.val_range
            val = np.asarray(corpus.tokens()[lo:min(hi, lo + a.val_tokens)])
            final = evaluate(store.arrays, store.spec, val, seq_len=cfg.train.seq_len,
                             batch_size=32, device="cpu").mean_loss
            # an attack is a train reply an attacker misbehaved in; replay, reuse and stale
            # have nothing to attack with in their first round and work honestly there
            attacks = set().union(*(n.attacked for n in nodes))
            honest = {n.id for n in nodes if n.behaviour == "honest"}
            res = RunResult(final_loss=final)
            attack_ids = set()
            res.val_loss = [v.val_loss for v in ledger.versions()]
            res.true_val_loss = [true_val_loss(ledger, v.version, store, cfg, corpus)
                                 for v in ledger.versions()]
            for update, lease in ledger.updates_with_leases():
                rejected = update.verdict != "accepted"
                if lease.nonce in attacks:
                    attack_ids.add(update.id)
                    res.submitted += 1
                    res.rejected += rejected
                    if rejected:
                        res.reasons[update.reason] = res.reasons.get(update.reason, 0) + 1
                elif update.node_id in honest:
                    res.honest_submitted += 1
                    res.honest_rejected += rejected
            res.attacker_credits = sum(c.amount for c in ledger.credits()
                                       if c.update_id in attack_ids)
            cost = loop.judge.cost
            res.verify_s_per_update = cost.per_update_s
            res.train_s_per_update = cost.train_s_per_update
            res.recomputes = cost.recomputes
    res.seconds = time.perf_counter() - t0
    return res


def true_val_loss(ledger, version: int, store, cfg, corpus) -> float:
    """The version's loss on the eval ranges its published number covers, computed here."""
    from training.checkpoint import load_checkpoint

    arrays, _ = load_checkpoint(ledger.versions()[version].path)
    spans = sorted({(x.data_start, x.data_end) for x in ledger.leases()
                    if x.kind == "eval" and x.round == version})
    parts = [evaluate(arrays, store.spec, np.asarray(corpus.tokens()[s:e]),
                      seq_len=cfg.train.seq_len, batch_size=32, device="cpu") for s, e in spans]
    return sum(p.loss_sum for p in parts) / sum(p.tokens for p in parts)


def rel_gap(published: list, reference: list) -> float:
    """Largest relative gap between two runs' (or a run's and the truth's) version losses."""
    pairs = [(p, r) for p, r in zip(published, reference) if p is not None and r]
    return max((abs(p - r) / r for p, r in pairs), default=0.0)


def cost_probe(corpus) -> dict[str, float]:
    """Verification of one update against training it, at the *default* config (tiny
    preset, default [train] and [verify]): one shard trained, then what the coordinator does
    with it — the per-reply checks' norm, the base check (one batch), the usefulness scoring
    (base on both batches and the local model), a spot-check comparison, and a recomputation
    (only on a mismatch)."""
    from coordinator.config import RunConfig
    from coordinator.run.model_store import model_config
    from coordinator.verify.rules import l2_norm, rel_l2
    from protocol.digest import digest_arrays
    from training.state import init_arrays

    cfg = RunConfig()
    gpt, t = model_config(cfg, corpus.vocab_size), cfg.train
    base = init_arrays(gpt, 0)
    lo, _ = corpus.train_range
    shard = np.asarray(corpus.tokens()[lo:lo + t.inner_steps * t.batch_size * t.seq_len])
    res = train_inner(base, gpt, shard, steps=t.inner_steps, batch_size=t.batch_size,
                      seq_len=t.seq_len, lr=t.lr, weight_decay=t.weight_decay, seed=1,
                      device="cpu")
    n = cfg.verify.usefulness_tokens + 1
    vlo, _ = corpus.val_range
    t0 = time.perf_counter()
    digest_arrays(res.pseudo_grad)
    l2_norm(res.pseudo_grad)
    first_batch_loss(base, gpt, shard, batch_size=t.batch_size, seq_len=t.seq_len, seed=1)
    local = {k: base[k] - res.pseudo_grad[k] for k in base}
    held_out = np.asarray(corpus.tokens()[vlo:vlo + n])
    for arrays, tokens in ((base, held_out), (local, held_out), (base, shard[:n]),
                           (local, shard[:n])):
        evaluate(arrays, gpt, tokens, seq_len=t.seq_len, batch_size=t.batch_size)
    rel_l2(res.pseudo_grad, res.pseudo_grad)
    verify_s = time.perf_counter() - t0
    return {"train_s": res.wall_s, "verify_s": verify_s, "ratio": verify_s / res.wall_s,
            "inner_steps": t.inner_steps}


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    kinds = [k for k in a.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown attack kinds {unknown}; choose from {', '.join(KINDS)}")
    t0 = time.perf_counter()
    corpus = build_stdlib_corpus(a.corpus_dir, max_bytes=3_000_000, val_every=20)
    results: dict[str, dict[bool, RunResult]] = {}
    for kind in [None, *kinds]:
        results[kind or "honest"] = {d: run_once(a, corpus, kind, d) for d in (True, False)}
        r = results[kind or "honest"]
        print(f"{kind or 'honest':>13}: defended loss {r[True].final_loss:.4f} "
              f"({r[True].rejected}/{r[True].submitted} rejected, {r[True].seconds:.0f} s), "
              f"undefended {r[False].final_loss:.4f} "
              f"({r[False].rejected}/{r[False].submitted} rejected)", file=sys.stderr)
    base = results["honest"]
    rows = []
    for kind in kinds:
        d, u = results[kind][True], results[kind][False]
        rows.append({
            "kind": kind,
            "loss_ratio": d.final_loss / base[True].final_loss,
            "loss_ratio_undefended": u.final_loss / base[False].final_loss,
            "rejected": [d.rejected, d.submitted],
            "rejected_undefended": [u.rejected, u.submitted],
            "reasons": d.reasons,
            "attacker_credits": round(d.attacker_credits, 6),
            "attacker_credits_undefended": round(u.attacker_credits, 6),
            "honest_rejected": d.honest_rejected,
            "val_loss_error": rel_gap(d.val_loss, base[True].val_loss),
            "val_loss_error_undefended": rel_gap(u.val_loss, base[False].val_loss),
            "published_error": rel_gap(d.val_loss, d.true_val_loss),
            "published_error_undefended": rel_gap(u.val_loss, u.true_val_loss),
        })
    defended = [results[k][True] for k in ["honest", *kinds]]
    verify_s = sum(r.verify_s_per_update for r in defended) / len(defended)
    train_s = sum(r.train_s_per_update for r in defended) / len(defended)
    probe = None if a.no_cost_probe else cost_probe(corpus)

    print(f"\n{a.nodes} nodes, {a.attackers} attackers, {a.rounds} rounds; loss ratio = final "
          f"validation loss / all-honest run's (honest: defended {base[True].final_loss:.4f}, "
          f"undefended {base[False].final_loss:.4f})")
    head = f"{'attack':>13} | {'loss ratio':>10} {'undefended':>10} | {'rejected':>9} " \
           f"{'undefended':>10} | {'credits':>7} {'undefended':>10} | {'val err':>7} " \
           f"{'undefended':>10} | reasons"
    print(head)
    print("-" * len(head))
    for r in rows:
        mark = "*" if r["kind"] in ADAPTIVE else ""
        print(f"{r['kind'] + mark:>13} | {r['loss_ratio']:>10.4f} "
              f"{r['loss_ratio_undefended']:>10.4f} | "
              f"{'%d/%d' % tuple(r['rejected']):>9} {'%d/%d' % tuple(r['rejected_undefended']):>10}"
              f" | {r['attacker_credits']:>7.3f} {r['attacker_credits_undefended']:>10.3f} | "
              f"{r['published_error']:>7.2%} {r['published_error_undefended']:>10.2%} | "
              + ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())))
    if any(r["kind"] in ADAPTIVE for r in rows):
        print("* adaptive: passes the cheap checks by design; spot checks are what catch it")
    honest_rejected = sum(r.honest_rejected for r in defended)
    headline = [r for r in rows if r["kind"] not in ADAPTIVE]
    adaptive = [r for r in rows if r["kind"] in ADAPTIVE]
    print("val err: largest relative gap between a version's published validation loss and "
          "its true loss on the same ranges")
    print(f"honest updates rejected (defended runs, train and eval): {honest_rejected} of "
          f"{sum(r.honest_submitted for r in defended)}")
    print(f"verification per update (bench model, {a.inner_steps} inner steps): {verify_s:.3f} s "
          f"vs {train_s:.3f} s training ({verify_s / max(train_s, 1e-9):.0%}); recomputations: "
          f"{sum(r.recomputes for r in defended)}")
    if probe:
        print(f"verification per update (default config, {probe['inner_steps']} inner steps): "
              f"{probe['verify_s']:.3f} s vs {probe['train_s']:.1f} s training "
              f"({probe['ratio']:.1%}); a spot-check recomputation costs one training (100%)")
    print(f"bench took {time.perf_counter() - t0:.0f} s")
    if a.json:
        print(json.dumps({
            "loss_ratio": max(r["loss_ratio"] for r in rows) if rows else 1.0,
            "loss_ratio_undefended": max(r["loss_ratio_undefended"] for r in rows) if rows else 1.0,
            "attacker_credits": round(sum(r["attacker_credits"] for r in headline), 6),
            "attacker_credits_undefended": round(sum(r["attacker_credits_undefended"]
                                                     for r in headline), 6),
            "attacker_credits_adaptive": round(sum(r["attacker_credits"] for r in adaptive), 6),
            "honest_rejected": honest_rejected,
            "val_loss_error_max": max((r["val_loss_error"] for r in rows), default=0.0),
            "val_loss_error_max_undefended": max((r["val_loss_error_undefended"]
                                                  for r in rows), default=0.0),
            "published_error_max": max((r["published_error"] for r in rows), default=0.0),
            "published_error_max_undefended": max((r["published_error_undefended"]
                                                   for r in rows), default=0.0),
            "rejected": {r["kind"]: r["rejected"] for r in rows},
            "rejected_undefended": {r["kind"]: r["rejected_undefended"] for r in rows},
            "per_kind": rows,
            "honest_final_loss": {"defended": base[True].final_loss,
                                  "undefended": base[False].final_loss},
            "verify_s_per_update": verify_s, "train_s_per_update": train_s,
            "cost_probe": probe,
            "setup": {"nodes": a.nodes, "attackers": a.attackers, "rounds": a.rounds,
                      "inner_steps": a.inner_steps, "seed": a.seed},
            "runs": {k: {str(d): asdict(r) for d, r in v.items()} for k, v in results.items()},
        }))


if __name__ == "__main__":
    main()

"""A small, deterministic run ledger for the views and TUI tests (fixed timestamps).

Four nodes, one per status at ``NOW``::

    aurora    Uni Alpha                     working: holds an open round-3 train lease
    borealis  Beta Institute of Technology  idle: seen 20 s ago; one update rejected (norm_bound)
    cygnus    Gamma College                 offline: last seen 500 s ago; one lease expired
    draco     Uni Alpha                     offline: enrolled, never seen, no work

Versions 0-2 with validation losses, eval shards in round 0, train shards in rounds 1-3,
credits for every accepted update, and the events the run loop would have written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.ledger import Ledger

__all__ = ["NOW", "T0", "FixtureRun", "build_fixture_ledger", "fixture_ledger",
           "fixture_ledger_copy"]

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
NOW = T0 + 600.0
RUN_ID = "fixture-run"
TRAIN_PER_1K, EVAL_PER_1K = 1.0, 0.1
SHARD = 40_960
EVAL = 8_192


@dataclass(frozen=True)
class FixtureRun:
    path: Path
    url: str
    now: float = NOW
    run_id: str = RUN_ID


class _Writer:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.nonce = 0

    def lease(self, node: int, rnd: int, shard: int, kind: str, base: int, at: float) -> int:
        self.nonce += 1
        return self.ledger.record_lease(
            run_id=RUN_ID, round=rnd, shard_id=shard, kind=kind, node_id=node, base_version=base,
            nonce=f"{self.nonce:032x}", data_start=shard * SHARD, data_end=(shard + 1) * SHARD,
            deadline=at + 300.0, issued_at=at).id or 0

    def answer(self, lease: int, node: int, kind: str, at: float, *, loss: tuple[float, float],
               reason: str | None = None, detail: str = "", norm: float | None = 19.25) -> int:
        # Eval shards differ in size so that no two nodes have the same credit total.
        tokens = SHARD if kind == "train" else EVAL - 1024 * (node - 1)
        verdict = "rejected" if reason else "accepted"
        upd = self.ledger.record_update(
            lease_id=lease, node_id=node, arrays_digest="ab" * 32, verdict=verdict,
            tokens=tokens, steps=40 if kind == "train" else 0, loss_before=loss[0],
            loss_after=loss[1], wall_s=50.0 if kind == "train" else 5.0, reason=reason,
            detail=detail or (f"accepted (norm {norm:.4g})" if kind == "train" else
                              "accepted (2 of 64 windows recomputed; largest gap 0.012%)"),
            norm=None if reason else norm if kind == "train" else 0.0,
            received_at=at)
        if verdict == "accepted":
            rate = TRAIN_PER_1K if kind == "train" else EVAL_PER_1K
            self.ledger.add_credit(node, upd.id or 0, tokens / 1000 * rate,
                                   {"kind": kind, "tokens": tokens, "rate_per_1k": rate}, now=at)
        return upd.id or 0


def build_fixture_ledger(path: Path) -> FixtureRun:
    """Write the fixture ledger to ``path`` (a SQLite file) and close it."""
    url = f"sqlite:///{path}"
    led = Ledger(url)
    w = _Writer(led)
    alpha = led.add_institution("Uni Alpha", now=T0).id or 0
    beta = led.add_institution("Beta Institute of Technology", now=T0).id or 0
    gamma = led.add_institution("Gamma College", now=T0).id or 0
    names = [("aurora", alpha), ("borealis", beta), ("cygnus", gamma), ("draco", alpha)]
    ids = []
    for i, (name, inst) in enumerate(names, start=1):
        node = led.add_node(1000 + i, name, inst, f"pem-{name}", f"fp{i:014d}", now=T0 + i)
        ids.append(node.id or 0)
        led.add_event("join", f"{name} enrolled as node {node.id}", node_id=node.id, at=T0 + i)
    a, b, c, _ = ids
    led.add_model_version(0, "00" * 32, "v0.safetensors", 0, n_updates=0, tokens=0,
                          created_at=T0 + 5)
    led.add_event("version", "version 0 initialised", at=T0 + 5)
    for n, name in zip((a, b, c), ("aurora", "borealis", "cygnus")):
        led.add_event("online", f"{name} is online", node_id=n, at=T0 + 6)
    # Round 0: the validation slice split over three nodes.
    evals = [w.answer(w.lease(n, 0, i, "eval", 0, T0 + 10), n, "eval", T0 + 30 + i,
                      loss=(5.5, 5.5)) for i, n in enumerate((a, b, c))]
    led.set_val_loss(0, 5.5, 3 * EVAL - 3 * 1024, update_ids=evals, windows_recomputed=6,
                     local_tokens=0)
    # Round 1: everyone trains, all accepted.
    for i, n in enumerate((a, b, c)):
        w.answer(w.lease(n, 1, i, "train", 0, T0 + 40), n, "train", T0 + 100 + i,
                 loss=(5.5, 3.0 + i / 10))
    led.add_model_version(1, "11" * 32, "v1.safetensors", 1, n_updates=3, tokens=3 * SHARD,
                          val_loss=3.2, val_tokens=3 * EVAL, created_at=T0 + 105)
    led.add_event("version", f"round 1: version 1 from 3 updates ({3 * SHARD} tokens)",
                  at=T0 + 105)
    # Round 2: aurora accepted, borealis rejected, cygnus silent until its lease expires.
    w.answer(w.lease(a, 2, 3, "train", 1, T0 + 140), a, "train", T0 + 200, loss=(3.2, 2.9))
    w.answer(w.lease(b, 2, 4, "train", 1, T0 + 140), b, "train", T0 + 201, loss=(3.2, 2.0),
             reason="norm_bound", detail="update norm 2500 exceeds the bound 1000")
    led.add_event("reject", "borealis: norm_bound — update norm 2500 exceeds the bound 1000",
                  node_id=b, at=T0 + 201)
    expired = w.lease(c, 2, 5, "train", 1, T0 + 140)
    led.add_model_version(2, "22" * 32, "v2.safetensors", 2, n_updates=1, tokens=SHARD,
                          val_loss=3.0, val_tokens=3 * EVAL, created_at=T0 + 205)
    led.add_event("version", f"round 2: version 2 from 1 updates ({SHARD} tokens)", at=T0 + 205)
    led.close_lease(expired, "expired", T0 + 250)
    led.add_event("reissue", "cygnus missed the deadline of train shard 5; it goes back to "
                  "the pool", node_id=c, at=T0 + 250)
    led.add_event("leave", "cygnus went offline", node_id=c, at=T0 + 260)
    # Round 3 (in progress at NOW): borealis done, aurora still training.
    w.answer(w.lease(b, 3, 5, "train", 2, NOW - 75), b, "train", NOW - 25, loss=(3.0, 2.7))
    w.lease(a, 3, 4, "train", 2, NOW - 30)
    led.touch_node(a, NOW - 5)
    led.touch_node(b, NOW - 20)
    led.touch_node(c, T0 + 100)
    led.close()
    return FixtureRun(path=path, url=url)


@pytest.fixture(scope="session")
def fixture_ledger(tmp_path_factory: pytest.TempPathFactory) -> FixtureRun:
    """The fixture ledger, built once per session. Only read it: tests that write use
    :func:`fixture_ledger_copy`."""
    return build_fixture_ledger(tmp_path_factory.mktemp("fixture") / "ledger.db")


@pytest.fixture
def fixture_ledger_copy(fixture_ledger: FixtureRun, tmp_path: Path) -> Iterator[FixtureRun]:
    """A private copy of the fixture ledger, free to write to."""
    path = tmp_path / "ledger.db"
    shutil.copyfile(fixture_ledger.path, path)
    yield FixtureRun(path=path, url=f"sqlite:///{path}")

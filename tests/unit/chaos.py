"""Kill the coordinator at a random point, start it again, and check that nothing was lost.

A ``kill -9`` stops the process between two instructions; what survives is what the ledger had
committed and what was on disk. So a crash is modelled exactly enough by raising ``Crash`` (a
``BaseException``: no ``except Exception`` of the coordinator catches it) as the ledger is about
to write for the n-th time: every transaction open at that moment rolls back, as an
uncommitted one does when its process dies, and every file already written stays. n ranges
over every write a run makes, so the crash lands mid-lease, mid-verification, mid-credit,
mid-outer-step (after the checkpoint and the optimizer state were written, before the ledger
recorded the version) and mid-evaluation.

After the crash a fresh coordinator (new ``RunLoop``, ``ModelStore`` and transport over the
same ledger and directories, the nodes carrying on) finishes the run, and ``violations``
checks the ledger's invariants.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from loop_world import make_net

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.accounting.statements import signed_receipt
from coordinator.ledger import Ledger
from coordinator.run.model_store import ModelStore
from protocol.errors import Reason
from protocol.kinds import Kind, Verdict
from protocol.receipts import verify_receipt
from protocol.signing import generate_key, public_key_pem
from training.checkpoint import load_checkpoint
from training.corpus import CorpusInfo

__all__ = ["ASYNC", "Crash", "run_chaos", "count_writes", "crash_at_write", "crash_points", "trial", "violations"]

SPECS = ["honest", "honest", "honest"]
# spot checks on: a crash may split a pair; the redone round must still judge it whole
VERIFY = "spot_check_rate = 0.5\neval_quorum_rate = 0.5"


class Crash(BaseException):
    """The process died here."""


@contextlib.contextmanager
def crash_at_write(ledger: Ledger, n: int | None, error: type[BaseException] = Crash
                   ) -> Iterator[list[int]]:
    """Raise ``error`` as ``ledger`` starts its ``n``-th write (None: never); yields a
    one-element list holding the count of writes so far. ``error=LedgerError`` is the
    database failing under a live coordinator instead of the coordinator dying."""
    count = [0]
    original = ledger._write

    @contextlib.contextmanager
    def write(what: str):  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] == n:
            raise error(f"write {n} ({what}) failed")
        with original(what) as session:
            yield session

    ledger._write = write  # type: ignore[method-assign]
    try:
        yield count
    finally:
        del ledger._write


# the asynchronous loop: two updates per outer step, so a step often holds a spot check's
# pair and leases of two versions are out at once
ASYNC = "[async]\nenabled = true\nbuffer = 2\nqueue = 1\n"


def _net(tmp: Path, corpus: CorpusInfo, key, rounds: int, nodes=None,  # type: ignore[no-untyped-def]
         extra: str = ""):
    return make_net(tmp, corpus, SPECS if nodes is None else [], rounds=rounds, nodes=nodes,
                    verify=VERIFY, seed=3, issuer=ReceiptIssuer(key), extra=extra)


def count_writes(tmp: Path, corpus: CorpusInfo, rounds: int, extra: str = "") -> int:
    """Ledger writes of a whole run without a crash (the range crash points come from)."""
    net = _net(tmp, corpus, generate_key(), rounds, extra=extra)
    with crash_at_write(net.ledger, None) as count:
        net.run()
    net.ledger.close()
    return count[0]


def trial(tmp: Path, corpus: CorpusInfo, rounds: int, n: int, extra: str = "") -> list[str]:
    """Crash a run at its ``n``-th ledger write, finish it with a fresh coordinator, and
    return the invariants it breaks (empty: none). ``extra``: more run.toml (``ASYNC``)."""
    key = generate_key()
    first = _net(tmp, corpus, key, rounds, extra=extra)
    crashed = False
    with crash_at_write(first.ledger, n):
        try:
            first.run()
        except Crash:
            crashed = True
    first.ledger.close()
    second = _net(tmp, corpus, key, rounds, nodes=first.nodes, extra=extra)
    try:
        second.run()
        return violations(second.ledger, second.store, rounds, key,
                          crashed=crashed, asynchronous=bool(extra))
    finally:
        second.ledger.close()


def violations(led: Ledger, store: ModelStore, rounds: int, key, *,  # type: ignore[no-untyped-def]
               crashed: bool = True, asynchronous: bool = False) -> list[str]:
    """The ledger's invariants after a run that should be complete (``rounds``: outer
    steps of the asynchronous loop)."""
    out: list[str] = []
    leases, updates = led.leases(), led.updates()
    lease_of = {x.id: x for x in leases}
    if open_ := [x.id for x in leases if x.status == "issued"]:
        out.append(f"leases left issued: {open_}")
    versions = led.versions()
    if [v.version for v in versions] != list(range(len(versions))):
        out.append(f"versions not consecutive: {[v.version for v in versions]}")
    if len(versions) != rounds + 1:
        out.append(f"{len(versions) - 1} versions from {rounds} rounds")
    if unscored := [v.version for v in versions if v.val_loss is None]:
        out.append(f"versions without a validation loss: {unscored}")
    train_rounds = sorted({x.round for x in leases if x.kind == Kind.TRAIN})
    if not asynchronous and train_rounds != list(range(1, rounds + 1)):
        out.append(f"train rounds {train_rounds}, expected 1..{rounds}")
    accepted = [u for u in updates if u.verdict == Verdict.ACCEPTED]
    if asynchronous:
        out += _async_versions(accepted, lease_of, versions)
    else:
        out += _round_versions(accepted, lease_of, versions)
    if dup := [k for k, n in Counter(u.lease_id for u in updates).items() if n > 1]:
        out.append(f"leases answered twice: {dup}")
    # a shard is consumed once: by one round (a spot check's pair shares its round)
    rounds_of: dict[int, set[int]] = {}
    for u in accepted:
        lease = lease_of[u.lease_id]
        if lease.kind == Kind.TRAIN:
            rounds_of.setdefault(lease.shard_id, set()).add(lease.round)
    if twice := {s: r for s, r in rounds_of.items() if len(r) > 1}:
        out.append(f"shards trained and accepted in two rounds: {twice}")
    out += _credits_and_receipts(led, updates, key)
    # the model is the ledger's latest version, and its optimizer state is that version's
    latest = versions[-1]
    arrays, meta = load_checkpoint(latest.path)
    if meta.get("digest") != latest.digest or store.digest != latest.digest:
        out.append("the model on disk is not the ledger's latest version")
    if latest.version > 0 and not store.outer_path(latest.version).exists():
        out.append(f"no outer optimizer state for version {latest.version}")
    return out


def _async_versions(accepted: list, lease_of: dict, versions: list) -> list[str]:
    """Every accepted train update is in exactly one version: the versions hold one update
    (and its tokens) per shard accepted (a spot check's pair shares its round), no more."""
    shards: dict[tuple[int, int], int] = {}
    for u in accepted:
        lease = lease_of[u.lease_id]
        if lease.kind == Kind.TRAIN:
            shards.setdefault((lease.round, lease.shard_id), u.tokens)
    held = (sum(v.n_updates for v in versions), sum(v.tokens for v in versions))
    if held != (len(shards), sum(shards.values())):
        return [f"the versions hold {held[0]} updates ({held[1]} tokens); "
                f"{len(shards)} shards were accepted ({sum(shards.values())} tokens)"]
    return []


def _round_versions(accepted: list, lease_of: dict, versions: list) -> list[str]:
    """Every accepted train update is in the version its round made: that version counts
    one update (and its tokens) per shard, as many as the round accepted."""
    out: list[str] = []
    per_round: dict[int, dict[int, int]] = {}
    for u in accepted:
        lease = lease_of[u.lease_id]
        if lease.kind == Kind.TRAIN:
            per_round.setdefault(lease.round, {}).setdefault(lease.shard_id, u.tokens)
    by_round = {v.round: v for v in versions if v.version > 0}
    for rnd, shards in sorted(per_round.items()):
        v = by_round.get(rnd)
        if v is None:
            out.append(f"round {rnd} accepted {len(shards)} updates and made no version")
        elif (v.n_updates, v.tokens) != (len(shards), sum(shards.values())):
            out.append(f"version {v.version} holds {v.n_updates} updates ({v.tokens} tokens); "
                       f"round {rnd} accepted {len(shards)} ({sum(shards.values())} tokens)")
    return out


def _credits_and_receipts(led: Ledger, updates: list, key) -> list[str]:  # type: ignore[no-untyped-def]
    """One credit per accepted update, a penalty only for a lost check, each with its
    receipt, every receipt verifying."""
    out: list[str] = []
    credits: dict[int, list[float]] = {}
    for c in led.credits():
        credits.setdefault(c.update_id, []).append(c.amount)
    for u in updates:
        got = credits.get(u.id, [])
        if u.verdict == Verdict.ACCEPTED and (len(got) != 1 or got[0] < 0):
            out.append(f"accepted update {u.id} has credits {got}")
        if u.verdict == Verdict.REJECTED and got and not (
                u.reason in Reason.MISMATCHES and len(got) == 1 and got[0] < 0):
            out.append(f"rejected update {u.id} ({u.reason}) has credits {got}")
    receipts = led.receipts()
    if len(receipts) != sum(len(v) for v in credits.values()):
        out.append(f"{len(receipts)} receipts for {sum(map(len, credits.values()))} credits")
    node_of = {u.id: u.node_id for u in updates}
    for r in receipts:
        try:
            verify_receipt(signed_receipt(r), public_key_pem(key), node_of[r.update_id])
        except Exception as err:  # noqa: BLE001 - any failure is the violation
            out.append(f"receipt of update {r.update_id} does not verify: {err}")
    return out


def crash_points(total: int, trials: int, seed: int) -> list[int]:
    """``trials`` distinct write numbers in 1..total, spread over the run."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, total + 1), min(trials, total)))


def run_chaos(root: Path, corpus: object, rounds: int, trials: int, seed: int = 0,
              extra: str = "", progress: bool = True) -> dict[str, object]:
    """Crash a run at ``trials`` ledger writes (0: every write) and count the trials that
    broke an invariant; ``extra`` is more run.toml (``chaos.ASYNC``: the asynchronous loop)."""
    (root / "count").mkdir()
    writes = count_writes(root / "count", corpus, rounds, extra)  # type: ignore[arg-type]
    points = (list(range(1, writes + 1)) if trials <= 0
              else crash_points(writes, trials, seed))
    failed: dict[int, list[str]] = {}
    for i, n in enumerate(points):
        (root / f"t{n}").mkdir()
        if bad := trial(root / f"t{n}", corpus, rounds, n, extra):  # type: ignore[arg-type]
            failed[n] = bad
        if progress:
            print(f"\r{i + 1}/{len(points)} crash points, {len(failed)} with violations",
                  end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    for n, bad in failed.items():
        print(f"killed at write {n}: {'; '.join(bad)}", file=sys.stderr)
    return {"rounds": rounds, "writes_per_run": writes, "chaos_trials": len(points),
            "chaos_violations": len(failed)}

"""The replies' own checks in processes beside the run loop (``coordinator.verify.checker``).

The checker must compute what the loop would (the same scores, so the same verdicts), hand
back an error — never hang — for a job whose process died, and leave no process behind.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import random
from pathlib import Path

import numpy as np
import pytest
from test_run_loop import (  # noqa: F401  (fixtures)
    assert_credit_only_for_accepted, corpus, network, nets, one_torch_thread, updates_by_lease,
)

from coordinator.verify.checker import Checker
from coordinator.verify.scoring import CheckJob, FirstBatch, Scorer, Span
from protocol.blobstore import BlobDir
from protocol.compression import Compression, decode, encode
from protocol.digest import arrays_to_bytes, digest_arrays
from protocol.errors import Reason
from training.model import GPTConfig
from training.state import init_arrays

SPEC = GPTConfig(vocab_size=256, n_layer=1, n_head=2, n_embd=32, block_size=32)
SEQ = 32


@pytest.fixture
def job_world(tmp_path: Path, corpus):  # type: ignore[no-untyped-def]
    """A base version in a blob store and three jobs on it: an honest-looking update, a
    zero update (a free rider's), and the base check alone."""
    base = init_arrays(SPEC, 0)
    digest = digest_arrays(base)
    blobs = BlobDir(tmp_path / "blobs")
    blobs.put(arrays_to_bytes(base), digest)
    rng = np.random.default_rng(0)
    update = {k: (0.01 * rng.standard_normal(a.shape)).astype(np.float32)
              for k, a in base.items()}
    lo, hi = corpus.train_range
    r = random.Random(1)
    held = Span(1, tuple(r.randrange(*corpus.val_range) - SEQ for _ in range(8)))
    own = Span(2, tuple(r.randrange(lo, lo + 2000) for _ in range(8)))
    first = FirstBatch(lo, lo + 2000, seed=3, batch_size=2, seq_len=SEQ)
    jobs = [CheckJob(4, digest, first, update, held, own),
            CheckJob(4, digest, first, {k: np.zeros_like(a) for k, a in base.items()}, held,
                     own),
            CheckJob(4, digest, first)]
    inline = Scorer(SPEC, corpus.tokens(), SEQ, 2, lambda v, d: base)
    return blobs, jobs, inline


def test_the_checker_computes_what_the_loop_would(job_world, corpus) -> None:
    blobs, jobs, inline = job_world
    checker = Checker(SPEC, corpus, blobs.root, seq_len=SEQ, batch_size=2)
    try:
        ids = [checker.submit(j) for j in jobs]
        got = dict(checker.results(math.inf))
    finally:
        checker.close()
    assert sorted(got) == ids and checker.jobs_done == 3 and checker.busy_s > 0
    for jid, job in zip(ids, jobs):
        want, res = inline.run(job), got[jid]
        assert res.error is None
        # one torch thread there, maybe more here: the last float digits may differ
        assert res.base_loss == pytest.approx(want.base_loss, rel=1e-5)
        if job.update is None:
            assert res.improvement is None and res.shard_gain is None
        else:
            assert res.improvement == pytest.approx(want.improvement, abs=1e-5)
            assert res.shard_gain == pytest.approx(want.shard_gain, abs=1e-5)
    assert got[ids[1]].improvement == pytest.approx(0.0, abs=1e-6)  # the free rider's
    assert not mp.active_children(), "a checker process was left running"


def test_a_lease_s_base_losses_computed_ahead_leave_its_reply_the_local_passes_only(
        job_world, corpus, monkeypatch) -> None:
    import coordinator.verify.scoring as scoring

    blobs, jobs, inline = job_world
    honest = jobs[0]
    passes: list[str] = []
    first_batch_loss, evaluate_model = scoring.first_batch_loss, scoring.evaluate_model
    monkeypatch.setattr(scoring, "first_batch_loss", lambda *a, **k: passes.append("first")
                        or first_batch_loss(*a, **k))
    monkeypatch.setattr(scoring, "evaluate_model", lambda *a, **k: passes.append("span")
                        or evaluate_model(*a, **k))
    fresh = Scorer(SPEC, corpus.tokens(), SEQ, 2, inline.base_of)
    ahead = dataclasses.replace(honest, update=None)  # what the lease names when issued
    early = fresh.run(ahead)
    assert passes == ["first", "span", "span"]  # the base: first batch, held-out, own shard
    assert early.improvement is None and early.base_loss is not None
    passes.clear()
    got = fresh.run(honest)  # the reply: the local model's two passes, nothing of the base
    assert passes == ["span", "span"]
    want = inline.run(honest)
    assert (got.base_loss, got.improvement, got.shard_gain) == (
        want.base_loss, want.improvement, want.shard_gain)


def test_a_job_names_its_update_by_digest_and_the_process_decodes_it(job_world, corpus) -> None:
    """The loop sends the payload's digest, not the arrays: the process reads the int8
    payload from the blob store and decodes it into what the loop itself decoded."""
    blobs, jobs, inline = job_world
    codec = Compression("int8", block=64)
    enc = encode(jobs[0].update, codec)
    payload = arrays_to_bytes(enc)
    digest = digest_arrays(enc)
    blobs.put(payload, digest)
    shapes = {k: (a.shape, a.dtype.str) for k, a in jobs[0].update.items()}
    decoded = decode(enc, codec, shapes, math.inf)
    by_digest = dataclasses.replace(jobs[0], update=None, update_digest=digest)
    checker = Checker(SPEC, corpus, blobs.root, seq_len=SEQ, batch_size=2, compression=codec)
    try:
        checker.submit(by_digest)
        [(_, res)] = checker.results(math.inf)
    finally:
        checker.close()
    want = inline.run(dataclasses.replace(jobs[0], update=decoded))
    assert res.error is None
    assert res.improvement == pytest.approx(want.improvement, abs=1e-5)
    assert res.shard_gain == pytest.approx(want.shard_gain, abs=1e-5)
    assert res.improvement != pytest.approx(inline.run(jobs[0]).improvement, abs=1e-7), \
        "the int8 round trip changed nothing: the test cannot tell decoded from raw"


def test_a_job_whose_blob_is_gone_or_whose_process_died_comes_back_as_an_error(
        job_world, corpus) -> None:
    blobs, jobs, _ = job_world
    checker = Checker(SPEC, corpus, blobs.root, seq_len=SEQ, batch_size=2)
    try:
        missing = checker.submit(CheckJob(5, "0" * 64, jobs[2].first_batch))
        [(jid, res)] = checker.results(math.inf)
        assert jid == missing and "no blob 000000000000" in (res.error or "")
        [proc] = checker._procs  # noqa: SLF001 - kill it the way an OOM killer would
        proc.kill()
        proc.join(5)
        lost = checker.submit(jobs[0])  # nothing alive to take it
        [(jid, res)] = checker.results(math.inf)
        assert jid == lost and "no checker process" in (res.error or "")
    finally:
        checker.close()
    assert not mp.active_children()


def test_a_process_dying_with_jobs_out_fails_them_and_does_not_hang(job_world, corpus) -> None:
    blobs, jobs, _ = job_world
    checker = Checker(SPEC, corpus, blobs.root, seq_len=SEQ, batch_size=2)
    try:
        ids = [checker.submit(jobs[0]) for _ in range(40)]
        checker._procs[0].kill()  # noqa: SLF001 - mid-queue
        got = dict(checker.results(math.inf))
    finally:
        checker.close()
    assert sorted(got) == ids
    errors = [r for r in got.values() if r.error is not None]
    assert errors and all("exited" in r.error for r in errors)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_run_with_the_checks_beside_the_loop_judges_as_the_loop_does(
        network, tmp_path: Path, asynchronous: bool) -> None:
    extra = "[async]\nenabled = true\nbuffer = 2\n" if asynchronous else ""
    net = network(["honest", "free_rider"], rounds=2, extra=extra,
                  verify="reject_duplicates = false\nnorm_factor = 0\ncheck_processes = 1")
    checker = net.loop.checker
    assert checker is not None
    ran_here, sent = [], []
    judge_run = net.loop.judge._run  # noqa: SLF001 - count the checks the loop runs itself
    net.loop.judge._run = lambda *a: ran_here.append(a) or judge_run(*a)  # noqa: SLF001
    submit = checker.submit
    keys: list[str | None] = []
    checker.submit = lambda job, key=None: (  # type: ignore[method-assign]
        sent.append(job) or keys.append(key) or submit(job, key))
    net.run()
    # each train lease's base losses went to the checker as it was issued, on the windows
    # its reply's job then named, under the same key (so to the same process)
    ahead = {k: (i, j) for i, (j, k) in enumerate(zip(sent, keys))
             if j.update is None and j.update_digest is None}
    replies = [(i, j, k) for i, (j, k) in enumerate(zip(sent, keys))
               if j.update is not None or j.update_digest is not None]
    assert ahead and replies and len(ahead) + len(replies) == len(sent)
    for i, job, key in replies:
        at, early = ahead[key]
        assert at < i and (early.first_batch, early.held, early.own) == (
            job.first_batch, job.held, job.own)
    sent = [j for _, j, _ in replies]
    # an uploaded update goes to the checker by its payload's digest (the honest node's);
    # one that came inside its message (the free rider signs zeros inline) as arrays
    scored = [j for j in sent if j.held is not None]
    by_digest = [j for j in scored if j.update_digest is not None]
    assert all(j.update is None for j in by_digest)
    assert all(j.update is not None for j in scored if j.update_digest is None)
    assert net.loop.checker is None and not mp.active_children(), "not reaped"
    assert not ran_here, "a step judged a reply before its checks came back"
    led = net.ledger
    bad = net.nodes[-1].id
    train = [(lease, u) for lease, u in updates_by_lease(led)
             if lease.kind == "train" and u is not None]
    assert checker.jobs_done == len(train) + len(ahead) and checker.busy_s > 0
    for lease, u in train:
        if lease.node_id == bad:
            assert (u.verdict, u.reason) == ("rejected", Reason.NOT_USEFUL), u.detail
        else:
            assert u.verdict == "accepted" and u.improvement is not None, u.detail
    assert [v.version for v in led.versions()] == [0, 1, 2]
    assert_credit_only_for_accepted(led)
    honest = [lease for lease, _ in train if lease.node_id != bad]
    assert honest and len(by_digest) == len(honest)


def test_a_run_whose_checker_dies_checks_the_replies_itself(network) -> None:
    net = network(["honest", "free_rider"], rounds=2,
                  verify="reject_duplicates = false\nnorm_factor = 0\ncheck_processes = 1")
    checker = net.loop.checker
    assert checker is not None
    checker.start()  # started and killed before any reply comes
    checker._procs[0].kill()  # noqa: SLF001
    net.run()
    led = net.ledger
    bad = net.nodes[-1].id
    for lease, u in updates_by_lease(led):
        if lease.kind == "train" and u is not None:
            want = ("rejected", Reason.NOT_USEFUL) if lease.node_id == bad else ("accepted", None)
            assert (u.verdict, u.reason) == want, u.detail
    assert [v.version for v in led.versions()] == [0, 1, 2]
    assert net.loop.checker is None
    assert any("checker processes are gone" in e.message for e in led.events())


def test_the_checker_processes_start_before_the_first_lease(network) -> None:
    # a spawn and import torch take seconds: the first round's checks must not wait for them
    net = network(["honest"], rounds=1, verify="check_processes = 1")
    checker = net.loop.checker
    assert checker is not None and not checker.started
    net.loop._wait_for_nodes()  # noqa: SLF001 - what both loops do before leasing
    assert checker.started and not checker.dead and checker.pending == 0
    net.loop.close()


def test_a_loop_without_replies_yet_keeps_its_checker(network) -> None:
    net = network(["honest"], rounds=1, verify="check_processes = 1")
    assert not net.loop._prepare(0.0)  # noqa: SLF001 - a pass before any reply came
    assert net.loop.checker is not None and not net.loop.checker.dead
    net.loop.close()


def test_a_checker_whose_coordinator_is_killed_exits_by_itself(tmp_path: Path, corpus) -> None:
    # kill -9 of the coordinator sends its checker no "stop": the checker must notice
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "a_coordinator.py"
    script.write_text(f"""
import math, sys
sys.path[:0] = {[str(Path(__file__).parent)]!r}
from pathlib import Path
from coordinator.verify.checker import Checker
from training.corpus import load_corpus
from test_checker import SPEC, SEQ

if __name__ == "__main__":
    c = Checker(SPEC, load_corpus(Path({str(corpus.path)!r})), Path({str(tmp_path)!r}),
                seq_len=SEQ, batch_size=2)
    c._start()
    print(c._procs[0].pid, flush=True)
    sys.stdin.read()  # until killed
""")
    coord = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        pid = int(coord.stdout.readline())
        os.kill(coord.pid, signal.SIGKILL)
        coord.wait()
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            try:  # reaped by init, or a zombie of ours: either way it exited
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the checker outlived its killed coordinator")
    finally:
        coord.kill()

"""The README's demo command, end to end: CLI, JSON summary, and what the ledger holds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.ledger import Ledger
from tests.pg_schema import fresh_schema


def test_demo_two_nodes_two_rounds(workdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--nodes", "2", "--rounds", "2",
         "--workdir", str(workdir), "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 2
    assert summary["run_status"] == "finished:completed"
    losses = summary["val_loss"]
    assert len(losses) == 3 and all(v is not None for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # clearly learned something
    assert Path(summary["checkpoint"]).exists()
    assert {n["name"] for n in summary["nodes"]} == {"node-a", "node-b"}

    with Ledger(summary["ledger"]) as ledger:
        nodes = ledger.nodes()
        assert len(nodes) == 2 and len(ledger.institutions()) == 2
        assert all(i.used_at is not None for i in ledger.invites())
        updates = ledger.updates()
        train = [u for u in updates if ledger.lease(u.lease_id).kind == "train"]
        assert len(train) == 4 and all(u.verdict == "accepted" for u in train)
        assert {u.node_id for u in train} == {n.id for n in nodes}
        credits = {c.update_id: c for c in ledger.credits()}
        assert set(credits) == {u.id for u in updates if u.verdict == "accepted"}
        for u in train:
            comp = credits[u.id].components_dict()
            assert comp["kind"] == "train" and comp["tokens"] == u.tokens > 0
        # the same shard never went to two nodes in one round, except for a spot check
        # (spot_check_rate is on by default), whose two results then agree bit for bit
        # (both nodes train on CPU with one thread) and count once
        leases = [lease for lease in ledger.leases() if lease.kind == "train"]
        per_round: dict[tuple[int, int], list[int]] = {}
        for lease in leases:
            per_round.setdefault((lease.round, lease.shard_id), []).append(lease.id)
        checked = [ids for ids in per_round.values() if len(ids) > 1]
        assert all(len(ids) == 2 for ids in checked)
        digest = {u.lease_id: u.arrays_digest for u in train}
        assert all(digest[a] == digest[b] for a, b in checked)
        spot_events = [e for e in ledger.events() if e.kind == "spot_check"]
        assert len(spot_events) == len(checked) and all("agree" in e.message for e in spot_events)
        versions = ledger.versions()
        assert [v.version for v in versions] == [0, 1, 2]
        assert [v.n_updates for v in versions[1:]] == [
            len({shard for rnd, shard in per_round if rnd == r}) for r in (1, 2)]
        summary_by_id = {n["node_id"]: n for n in summary["nodes"]}
        for s in ledger.node_summaries():
            assert summary_by_id[s.node_id]["credits"] == round(s.credits, 6)
            assert summary_by_id[s.node_id]["tokens"] == s.tokens
        # bytes travelled by digest: every version, its change from the previous one (int8
        # broadcast), each shard and update payload is a blob of the coordinator; each node
        # built version 0 from its seed (checked against its digest, no bytes moved) and
        # fetched every later version as its change
        def blob(root: Path, digest: str) -> Path:
            return root / digest[:2] / digest

        assert all(blob(workdir / "blobs", v.digest).is_file() for v in versions)
        ranges = {(lease.data_start, lease.data_end) for lease in ledger.leases()}
        payloads = {u.arrays_digest for u in train}  # uploaded (a spot check's pair: once)
        assert all(blob(workdir / "blobs", d).is_file() for d in payloads)
        changes = len(versions) - 1
        assert len(list((workdir / "blobs").glob("??/*"))) == (
            len(versions) + changes + len(ranges) + len(payloads))
        for i in range(2):
            cache = workdir / "nodes" / str(i) / "blobs"
            assert blob(cache, versions[0].digest).is_file(), i
            log = (workdir / "nodes" / str(i) / "logs" / "worker.log").read_text()
            assert re.findall(r"built model ([0-9a-f]{64}) from seed", log) == [
                versions[0].digest]
            assert re.findall(r"fetched model ([0-9a-f]{64})", log) == []
            assert len(re.findall(r"fetched model delta ", log)) == changes, log[-2000:]
        # one warm worker per node answered every lease of that node, and downloaded each
        # blob at most once (the eval queued behind a train lease took its base from memory)
        by_name = {n.name: n.id for n in nodes}
        for i, name in enumerate(("node-a", "node-b")):
            log = (workdir / "nodes" / str(i) / "logs" / "worker.log").read_text()
            pids = re.findall(r"pid (\d+) answered", log)
            mine = [lease for lease in ledger.leases() if lease.node_id == by_name[name]
                    and lease.status == "answered"]
            assert len(pids) == len(mine) >= 3 and len(set(pids)) == 1, (name, pids)
            fetched = re.findall(r"fetched \w+ ([0-9a-f]{64})", log)
            assert fetched and len(fetched) == len(set(fetched)), fetched
        # each SuperNode (atom-supernode) took the message queued behind the one its worker
        # was running, never more than two (Flower's own loop takes one at a time)
        for i in range(2):
            text = (workdir / "nodes" / str(i) / "logs" / "supernode.log").read_text()
            depth = peak = 0
            for line in text.splitlines():
                if "Receiving: " in line:
                    depth += 1
                    peak = max(peak, depth)
                elif "Sent successfully" in line:
                    depth -= 1
            assert peak == 2, text[-3000:]
        # every reply was handed to the coordinator's service too, and the run loop took
        # each one from its spool (what it left there, it never took)
        for i in range(2):
            log = (workdir / "nodes" / str(i) / "logs" / "worker.log").read_text()
            assert "reply handed to Flower only" not in log, log[-2000:]
        assert not [p.name for p in (workdir / "replies").iterdir()]
        # round 2's leases were taken beside Flower as soon as they were issued (each node
        # asked for the work after the lease it answered), and Flower's copies were answered
        # with the same replies: each lease ran once
        for i, name in enumerate(("node-a", "node-b")):
            log = (workdir / "nodes" / str(i) / "logs" / "worker.log").read_text()
            assert "taken beside Flower" in log, log[-2000:]
            assert "lease failed" not in log, log[-2000:]
            ran = re.findall(r'lease \{"nonce": "([0-9a-f]{32})"', log)
            mine = [lease.nonce for lease in ledger.leases()
                    if lease.node_id == by_name[name] and lease.status == "answered"]
            assert sorted(ran) == sorted(mine), (name, ran, mine)
        assert not list((workdir / "next-work").iterdir())  # the run's end cleared it


def test_demo_on_a_given_postgresql_ledger(workdir: Path) -> None:
    # `demo --ledger URL`: the main job on the production ledger backend (a fresh schema)
    base = os.environ.get("ATOM_TEST_PG_URL")
    if not base:
        if os.environ.get("CI") == "true":
            pytest.fail("ATOM_TEST_PG_URL is not set: CI must run the demo on PostgreSQL too")
        pytest.skip("set ATOM_TEST_PG_URL to run the demo on PostgreSQL")
    with fresh_schema(base, "demo") as url_text:
        proc = subprocess.run(
            [sys.executable, "-m", "coordinator", "demo", "--nodes", "1", "--rounds", "1",
             "--workdir", str(workdir), "--ledger", url_text, "--json"],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["run_status"] == "finished:completed"
        assert not (workdir / "ledger.db").exists()
        with Ledger(url_text, create=False) as ledger:
            versions = ledger.versions()
            assert [v.version for v in versions] == [0, 1]
            assert all(v.val_loss is not None and ledger.version_evals(v.version)
                       for v in versions)
            assert len(ledger.nodes()) == 1
        # the same database again: the demo refuses to mix its run into another's
        again = subprocess.run(
            [sys.executable, "-m", "coordinator", "demo", "--nodes", "1", "--rounds", "1",
             "--workdir", str(workdir.with_name("again")), "--ledger", url_text],
            capture_output=True, text=True, timeout=120)
        assert again.returncode != 0
        assert again.stderr.strip().splitlines()[-1].startswith("error: ledger ")
        assert "already holds a run" in again.stderr


"""The asynchronous loop over real Flower processes on loopback, with both Prometheus
endpoints scraped during the run: the coordinator's (its run loop in the ServerApp process,
its data plane in its own) and a node's (its warm worker), parsed with prometheus_client's
own text parser."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from coordinator.demo import run_demo
from coordinator.ledger import Ledger
from coordinator.rundir import RunDir
from protocol.processes import free_port

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115


def _scrape(address: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_async_run_with_coordinator_and_node_metrics(workdir: Path) -> None:
    node_address = f"127.0.0.1:{free_port()}"
    seen: dict[str, dict] = {}

    def scrape(procs: list[subprocess.Popen[bytes]], ledger: Ledger) -> None:
        versions = ledger.versions()
        if "coordinator" in seen or len(versions) < 2 or versions[1].val_loss is None:
            return  # mid-run: a version made and evaluated, the run still going
        address = RunDir(workdir).config().network.metrics_address
        seen["coordinator"], seen["node"] = _scrape(address), _scrape(node_address)

    summary, status = run_demo(nodes=2, rounds=3, workdir=workdir, console=QUIET,
                               overrides={"async_enabled": True, "train_inner_steps": 60},
                               # one node 2.5x slower: the other's leases run ahead of
                               # it, so "no barrier" below never hangs on two replies
                               # landing in the same poll
                               node_args={0: ["--metrics", node_address],
                                          1: ["--slowdown", "2.5"]}, on_tick=scrape)
    assert status == "finished:completed", summary
    _no_barrier_and_nothing_lost(summary)
    c, n = seen["coordinator"], seen["node"]
    assert c[("atom_leases_issued_total", (("kind", "train"),))] >= 2
    accepted = [v for (name, labels), v in c.items() if name == "atom_updates_total"
                and ("verdict", "accepted") in labels]
    assert sum(accepted) >= 2
    assert c[("atom_tokens_accepted_total", (("kind", "train"),))] > 0
    assert c[("atom_model_version", ())] >= 1
    assert c[("atom_nodes_online", ())] == 2
    assert c[("atom_verification_seconds_count", (("stage", "screen"),))] >= 2
    assert c[("atom_outer_step_seconds_count", ())] >= 1
    assert c[("atom_ledger_write_seconds_count", ())] > 0
    assert c[("atom_blob_bytes_total", (("direction", "out"),))] > 0  # models and shards
    assert c[("atom_blob_bytes_total", (("direction", "in"),))] > 0  # update payloads
    assert n[("atom_node_tokens_total", (("kind", "train"),))] > 0
    assert n[("atom_node_busy_seconds_total", (("kind", "train"),))] > 0
    assert n[("atom_node_tokens_per_second", ())] > 0
    assert n[("atom_node_step_seconds_count", ())] >= 1
    assert n[("atom_node_cache_lookups_total", (("result", "miss"),))] >= 1
    assert n[("atom_node_transfer_bytes_total", (("direction", "down"),))] > 0
    assert n[("atom_node_transfer_bytes_total", (("direction", "up"),))] > 0


def _no_barrier_and_nothing_lost(summary: dict) -> None:
    losses = summary["val_loss"]
    assert len(losses) == 4 and all(v is not None for v in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses
    with Ledger(summary["ledger"]) as ledger:
        leases = ledger.leases()
        assert all(x.status == "answered" for x in leases), [x.status for x in leases]
        updates = {u.lease_id: u for u in ledger.updates()}
        train = [x for x in leases if x.kind == "train"]
        assert all(updates[x.id].verdict == "accepted" for x in train)
        # every accepted shard is in exactly one version (a spot check's pair counts once)
        versions = ledger.versions()
        assert [v.version for v in versions] == [0, 1, 2, 3]
        assert sum(v.n_updates for v in versions) == len({(x.round, x.shard_id) for x in train})
        # no barrier: a node's next train lease was issued as soon as it answered, while
        # the other node's lease of an older version was still out
        assert any(x.base_version < y.base_version and x.closed_at > y.issued_at
                   for x in train for y in train if x.node_id != y.node_id)
        credits = {c.update_id for c in ledger.credits()}
        assert credits == {u.id for u in updates.values() if u.verdict == "accepted"}

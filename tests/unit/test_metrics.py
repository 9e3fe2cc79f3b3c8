"""Prometheus metrics: names and labels (a contract with dashboards), the multiprocess
endpoint, what the recording path counts, and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import coordinator.metrics as cm
import node.metrics as nm
from coordinator.config import parse_config
from protocol.errors import ConfigError, NetworkError
from protocol.metrics import MULTIPROC_ENV, multiprocess_env, parse_address, serve_metrics
from protocol.processes import free_port

ROOT = Path(__file__).resolve().parents[2]

# name: (type, label names) — change one only with the dashboards that use it
COORDINATOR = {
    "atom_leases_issued": ("counter", ("kind",)),
    "atom_leases_closed": ("counter", ("kind", "status")),
    "atom_updates": ("counter", ("kind", "verdict", "reason")),
    "atom_tokens_accepted": ("counter", ("kind",)),
    "atom_verification_seconds": ("histogram", ("stage",)),
    "atom_outer_step_seconds": ("histogram", ()),
    "atom_update_staleness": ("histogram", ()),
    "atom_nodes_online": ("gauge", ()),
    "atom_model_version": ("gauge", ()),
    "atom_ledger_write_seconds": ("histogram", ()),
    "atom_blob_bytes": ("counter", ("direction",)),
}
NODE = {
    "atom_node_leases": ("counter", ("kind",)),
    "atom_node_tokens": ("counter", ("kind",)),
    "atom_node_busy_seconds": ("counter", ("kind",)),
    "atom_node_step_seconds": ("histogram", ()),
    "atom_node_tokens_per_second": ("gauge", ()),
    "atom_node_device_memory_bytes": ("gauge", ()),
    "atom_node_cache_lookups": ("counter", ("result",)),
    "atom_node_transfer_bytes": ("counter", ("direction",)),
}


def declared(module) -> dict[str, tuple[str, tuple[str, ...]]]:  # type: ignore[no-untyped-def]
    out = {}
    for name in module.__all__:
        m = getattr(module, name)
        if isinstance(m, MetricWrapperBase):
            out[m._name] = (m._type, tuple(m._labelnames))  # noqa: SLF001 - the contract
    return out


def test_metric_names_and_labels_are_stable() -> None:
    assert declared(cm) == COORDINATOR
    assert declared(nm) == NODE


def test_recording_a_verdict_counts_it_by_reason(tmp_path: Path) -> None:
    # the one recording path (verify.record.record_judged) counts every verdict
    from loop_world import build_test_corpus, make_net as net_of

    corpus = build_test_corpus(tmp_path / "corpus")
    before = {r: REGISTRY.get_sample_value("atom_updates_total", {
        "kind": "train", "verdict": v, "reason": r}) or 0.0
        for r, v in (("", "accepted"), ("bad_signature", "rejected"))}
    tokens = REGISTRY.get_sample_value("atom_tokens_accepted_total", {"kind": "train"}) or 0.0
    net = net_of(tmp_path, corpus, ["honest", "wrong_key"], rounds=1)
    net.run()
    net.ledger.close()
    after = {r: REGISTRY.get_sample_value("atom_updates_total", {
        "kind": "train", "verdict": v, "reason": r})
        for r, v in (("", "accepted"), ("bad_signature", "rejected"))}
    assert after[""] - before[""] == 1 and after["bad_signature"] - before["bad_signature"] == 1
    assert REGISTRY.get_sample_value("atom_tokens_accepted_total",
                                     {"kind": "train"}) - tokens == 3 * 2 * 32


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_endpoint_serves_what_child_processes_wrote_and_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    env = multiprocess_env(folder)
    child = ("from node import metrics as m; m.TOKENS.labels('train').inc(5); "
             "m.TOKENS_PER_SECOND.set(42)")
    for _ in range(2):  # a restarted worker adds to the same counters
        subprocess.run([sys.executable, "-c", child], check=True, cwd=ROOT,
                       env={**_env(), **env})
    own = CollectorRegistry()
    Counter("atom_test_own", "the parent's own", registry=own).inc(3)
    server = serve_metrics(f"127.0.0.1:{free_port()}", folder, own=own)
    try:
        got = scrape(server.url)
        assert got[("atom_node_tokens_total", (("kind", "train"),))] == 10.0
        assert got[("atom_node_tokens_per_second", ())] == 42.0
        assert got[("atom_test_own_total", ())] == 3.0
        with pytest.raises(NetworkError, match="cannot serve metrics on"):
            serve_metrics(f"127.0.0.1:{server.address[1]}", folder)  # taken
    finally:
        server.close()
    assert MULTIPROC_ENV not in _env()  # this process keeps its metrics in memory


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}


def test_addresses_are_checked(tmp_path: Path) -> None:
    assert parse_address("127.0.0.1:9094") == ("127.0.0.1", 9094)
    for bad in ("9094", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    from loop_world import run_toml

    with pytest.raises(ConfigError, match=r"\[network\]\.metrics_address must be"):
        parse_config(run_toml(1, extra='[network]\nmetrics_address = "nowhere"\n'), tmp_path)
    assert parse_config(run_toml(1, extra='[network]\nmetrics_address = ""\n'),
                        tmp_path).network.metrics_address == ""


def test_the_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    board = json.loads((ROOT / "docs" / "grafana" / "atom-network.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    known = set(COORDINATOR) | set(NODE)
    for expr in exprs:
        for name in re.findall(r"\batom_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in known, (name, expr)

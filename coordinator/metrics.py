"""The coordinator's Prometheus metrics (``[network] metrics_address``, README "Watching a
run"; the Grafana dashboard in ``docs/grafana/atom-network.json`` uses them).

Most are recorded by the run loop in the ServerApp process (multiprocess mode, see
``protocol.metrics``); the data plane's bytes by the gRPC service in the coordinator's own
process, in ``SERVICE``, which the coordinator serves beside them. Names and labels are a
contract with dashboards: ``tests/unit/test_metrics.py`` lists them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BLOB_BYTES", "LEASES_CLOSED", "LEASES_ISSUED", "LEDGER_WRITE_SECONDS",
           "MODEL_VERSION", "NODES_ONLINE", "OUTER_STEP_SECONDS", "SERVICE", "STALENESS",
           "TOKENS_ACCEPTED", "UPDATES", "VERIFY_SECONDS"]

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

LEASES_ISSUED = Counter("atom_leases_issued", "Leases sent to nodes", ["kind"])
LEASES_CLOSED = Counter("atom_leases_closed", "Leases closed without a reply to judge "
                        "(expired: past the deadline; failed: the node answered an error; "
                        "handed_back: the node's policy paused it, or it left)",
                        ["kind", "status"])
UPDATES = Counter("atom_updates", "Replies judged, by verdict and rejection reason "
                  "(reason is empty for accepted ones)", ["kind", "verdict", "reason"])
TOKENS_ACCEPTED = Counter("atom_tokens_accepted", "Tokens of accepted work (rate(): the "
                          "network's verified tokens per second)", ["kind"])
VERIFY_SECONDS = Histogram("atom_verification_seconds", "Seconds verifying: one reply as it "
                           "arrives (screen), a round's or an outer step's rules (judge)",
                           ["stage"], buckets=_SLOW)
OUTER_STEP_SECONDS = Histogram("atom_outer_step_seconds", "Seconds to aggregate the accepted "
                               "updates and make the next version", buckets=_SLOW)
STALENESS = Histogram("atom_update_staleness", "Versions between an aggregated update's base "
                      "and the version it is applied to", buckets=(0, 1, 2, 3, 4, 6, 8, 16))
NODES_ONLINE = Gauge("atom_nodes_online", "Enrolled, unrevoked nodes online",
                     multiprocess_mode="mostrecent")
MODEL_VERSION = Gauge("atom_model_version", "The latest model version",
                      multiprocess_mode="mostrecent")
LEDGER_WRITE_SECONDS = Histogram("atom_ledger_write_seconds", "Seconds per ledger write "
                                 "transaction", buckets=_FAST)

# the coordinator process's own (the gRPC service)
SERVICE = CollectorRegistry()
BLOB_BYTES = Counter("atom_blob_bytes", "Blob bytes through the data plane: out (nodes "
                     "fetching models and shards) and in (update payloads)", ["direction"],
                     registry=SERVICE)

"""A node's Prometheus metrics (``atom-node join --metrics HOST:PORT``), recorded by its warm
worker (multiprocess mode, see ``protocol.metrics``) and served by ``atom-node join``.
Utilization is ``rate(atom_node_busy_seconds_total[5m])``. Names and labels are a contract
with dashboards: ``tests/unit/test_metrics.py`` lists them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["BUSY_SECONDS", "CACHE_LOOKUPS", "DEVICE_MEMORY", "LEASES", "STEP_SECONDS",
           "TOKENS", "TOKENS_PER_SECOND", "TRANSFER_BYTES"]

LEASES = Counter("atom_node_leases", "Leases worked on", ["kind"])
TOKENS = Counter("atom_node_tokens", "Tokens trained or evaluated", ["kind"])
BUSY_SECONDS = Counter("atom_node_busy_seconds", "Seconds inside training and evaluation "
                       "(rate(): utilization)", ["kind"])
STEP_SECONDS = Histogram("atom_node_step_seconds", "Mean seconds per inner step, one "
                         "observation per train lease",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
TOKENS_PER_SECOND = Gauge("atom_node_tokens_per_second", "Training speed of the last train "
                          "lease", multiprocess_mode="mostrecent")
DEVICE_MEMORY = Gauge("atom_node_device_memory_bytes", "Peak accelerator memory of the last "
                      "lease (0 on CPU)", multiprocess_mode="mostrecent")
CACHE_LOOKUPS = Counter("atom_node_cache_lookups", "Blobs a lease needed: found in the "
                        "cache (hit) or fetched (miss)", ["result"])
TRANSFER_BYTES = Counter("atom_node_transfer_bytes", "Bytes fetched (down) and uploaded (up)",
                         ["direction"])

"""Prometheus metrics over HTTP: one ``/metrics`` endpoint per machine role.

The coordinator's run loop runs in Flower's ServerApp process and a node's work in its warm
worker: processes that come and go below a long-lived parent (``atom-coordinator start``,
``atom-node join``). They record their metrics in prometheus_client's multiprocess mode — the
parent starts them with ``multiprocess_env`` (``PROMETHEUS_MULTIPROC_DIR``: an emptied folder
of memory-mapped files) — and the parent serves what they wrote with ``serve_metrics``,
beside metrics it keeps itself in a registry of its own. A restarted child adds to the same
counters (the files of a dead process still count), so a worker crash does not reset them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from protocol.errors import ConfigError, NetworkError

__all__ = ["MULTIPROC_ENV", "MetricsServer", "multiprocess_env", "parse_address",
           "serve_metrics"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_env(folder: Path) -> dict[str, str]:
    """Empty ``folder`` (metrics of an earlier start would be counted again) and return the
    environment that makes a child process write its metrics there."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {MULTIPROC_ENV: str(folder)}


def parse_address(text: str, what: str = "metrics address") -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ``ConfigError`` naming ``what`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class _Also:
    """Serves another registry's metrics as part of this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()


class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    def __init__(self, server: Any, address: tuple[str, int]) -> None:
        self._server, self.address = server, address

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(address: str, folder: Path, own: CollectorRegistry | None = None
                  ) -> MetricsServer:
    """Serve the metrics the children write to ``folder``, and ``own``, on ``address``
    (``HOST:PORT``); ``NetworkError`` if it cannot listen there."""
    host, port = parse_address(address)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    if own is not None:
        registry.register(_Also(own))
    try:
        server, _thread = start_http_server(port, host, registry=registry)
    except OSError as err:
        raise NetworkError(f"cannot serve metrics on {address}: "
                           f"{err.strerror or err}") from None
    return MetricsServer(server, (host, server.server_address[1]))

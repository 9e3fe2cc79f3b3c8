"""Bring a coordinator up: corpus, SuperLink (TLS + node auth), the gRPC service, the run.

Shared by ``atom-coordinator start`` and the demo, so both run exactly the same stack.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from protocol.blobstore import BlobDir
from protocol.errors import NetworkError
from protocol.metrics import MetricsServer, multiprocess_env, serve_metrics
from protocol.processes import free_port, process_token

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.metrics import SERVICE
from coordinator.run.model_store import model_config, model_params, run_vocab_size
from coordinator.rundir import RunDir, prepare_corpus
from coordinator.run.reply_spool import ReplySpool, WorkSpool
from coordinator.services.enrollment import Enroller
from coordinator.services.fleet_proxy import FleetProxy
from coordinator.services.grpc_service import CoordinatorService, serve, upload_limit
from coordinator.services.revocation import clear_superlink_state, unregister_revoked, write_superlink_state
from coordinator.services.superlink import SuperLink

__all__ = ["Coordinator"]


@dataclass
class Coordinator:
    rd: RunDir
    cfg: RunConfig = field(init=False)
    ledger: Ledger = field(init=False)
    superlink: SuperLink | None = None
    proxy: FleetProxy | None = None
    server: grpc.Server | None = None
    service: CoordinatorService | None = None
    metrics: MetricsServer | None = None

    def __post_init__(self) -> None:
        self.cfg = self.rd.config()
        model_config(self.cfg)  # a bad [model] fails here, before anything starts
        # (at the byte vocabulary: the tokenizer's is known once start() has the corpus)

    def __enter__(self) -> Coordinator:
        self.ledger = self.rd.ledger(self.cfg)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cfg, rd = self.cfg, self.rd
        # the model at the corpus's vocabulary, checked before any process starts
        params = model_params(cfg, run_vocab_size(prepare_corpus(rd, cfg)))
        # The SuperLink's port also serves Flower's unauthenticated Control API: it listens on
        # loopback only, and nodes reach its Fleet API through the proxy on the public port.
        private_port = free_port()
        env: dict[str, str] = {}
        if cfg.network.metrics_address:
            # the run loop (the ServerApp, below the SuperLink) writes its metrics to files
            # that this process serves with its own
            folder = rd.path / "metrics"
            env = multiprocess_env(folder)
            self.metrics = serve_metrics(cfg.network.metrics_address, folder, own=SERVICE)
        self.superlink = SuperLink(rd.path, rd.tls, "127.0.0.1", private_port, env=env)
        self.superlink.start()
        unregister_revoked(self.ledger, self.superlink)  # revoked while we were down
        for stale in self.superlink.unfinished_runs():  # a crashed coordinator's run
            self.superlink.stop_run(stale)
            self.ledger.add_event("run", f"Flower run {stale} of a coordinator that stopped "
                                         "without finishing it is stopped")
        self.proxy = FleetProxy(rd.path, rd.tls.server_cert, rd.tls.server_key, rd.tls.ca_cert,
                                cfg.network.host, cfg.network.fleet_port, private_port)
        self.proxy.start()
        write_superlink_state(rd, private_port)  # for `atom-coordinator revoke-node`
        enroller = Enroller(self.ledger, self.superlink.register_node,
                            self.superlink.unregister_node)
        service = CoordinatorService(enroller, cfg.run.id, rd.fleet_address(cfg),
                                     rd.public_key_pem(), ReceiptIssuer.load(rd.key_path),
                                     blobs=BlobDir(rd.blobs), max_upload_bytes=upload_limit(
                                         params, cfg.compression.scheme),
                                     replies=ReplySpool(rd.replies),
                                     next_work=WorkSpool(rd.next_work))
        self.service = service
        self.server = serve(service, cfg.network.host, cfg.network.coordinator_port,
                            rd.tls.server_cert.read_bytes(), rd.tls.server_key.read_bytes())

    def start_run(self) -> int:
        assert self.superlink is not None
        # the ServerApp runs two processes below the SuperLink and leaves when we or the
        # SuperLink are gone (a restart must not find the old one still writing)
        assert self.superlink.proc is not None
        return self.superlink.start_run({
            "workdir": str(self.rd.path),
            "owners": f"{process_token()},{process_token(self.superlink.proc.pid)}"})

    def wait(self, run_id: int, *, timeout: float = float("inf"),
             tick: Callable[[], None] | None = None) -> str:
        """Block until the run finishes (or ``timeout``); returns Flower's run status."""
        assert self.superlink is not None
        end = time.monotonic() + timeout
        while True:
            status = self.superlink.run_status(run_id)  # SuperLinkDied if it exited
            if status.startswith("finished") or time.monotonic() > end:
                return status
            if self.proxy is not None and self.proxy.proc is not None \
                    and self.proxy.proc.poll() is not None:
                raise NetworkError("the Fleet proxy exited during the run "
                                   f"(see {self.rd.logs / 'fleet-proxy.log'})")
            if tick is not None:
                tick()
            time.sleep(0.5)

    def failure(self, status: str) -> str | None:
        """None for a completed run, else the run's last recorded error (one line)."""
        if status.endswith("completed"):
            return None
        last, since = None, 0
        while events := self.ledger.events(since_id=since):  # paged: long runs log a lot
            last = next((e.message for e in reversed(events) if e.kind == "error"), last)
            since = events[-1].id
        return last or f"run ended as {status}"

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.service is not None:  # status streams end now, not after the grace
            self.service.close()
            self.service = None
        if self.server is not None:
            self.server.stop(grace=1.0).wait()
            self.server = None
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.superlink is not None:
            clear_superlink_state(self.rd)
            self.superlink.stop()
            self.superlink = None
        if getattr(self, "ledger", None) is not None:
            self.ledger.close()

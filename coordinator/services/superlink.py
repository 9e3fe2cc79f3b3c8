"""The coordinator's Flower SuperLink: process, Control API client, app submission.

The SuperLink is started with TLS and SuperNode auth, so only keys the coordinator registered
(at enrollment) can pull work. Its Control API is unauthenticated in open-source Flower, so the
coordinator talks to it on loopback only.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flwr.cli.build import build_fab_from_files
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.supercore.fab import Fab
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control.control_http_client import ControlHttpClient
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

from protocol.errors import NetworkError
from protocol.processes import flower_env, spawn, stop, wait_port

from coordinator.services.pki import TlsFiles

__all__ = ["SuperLink", "app_pyproject"]

APP_NAME = "atom-network"
# a read that fails is tried again after each of these (~31 s in all): one HTTP 500 from the
# SuperLink ended a run once (issue 10); a SuperLink down for longer ends it
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

log = logging.getLogger(__name__)


class SuperLinkDied(NetworkError):
    """The SuperLink process we started has exited (``atom-coordinator start`` restarts it)."""


def app_pyproject(version: str = "1.0.0") -> bytes:
    """The whole FAB: a pyproject naming components of the *installed* package.

    Nodes refuse bundles that carry code, so the app travels as configuration only.
    """
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{version}"
description = "ATOM Network training run"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "atom"

[tool.flwr.app.components]
serverapp = "coordinator.run.server_app:app"
clientapp = "node.client_app:app"

[tool.flwr.app.config]
workdir = ""
owners = ""
""".encode()


@dataclass
class SuperLink:
    """A running ``flower-superlink`` with TLS and SuperNode auth."""

    workdir: Path
    tls: TlsFiles
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    env: dict[str, str] = field(default_factory=dict)  # more environment (the ServerApp's too)

    @property
    def local_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = flower_env(self.workdir / "flwr-home", self.env)
        cmd = [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.tls.ca_cert),
            "--ssl-certfile", str(self.tls.server_cert),
            "--ssl-keyfile", str(self.tls.server_key),
            "--enable-supernode-auth",
            # A persistent state keeps node ids and registered keys across restarts.
            "--database", str(self.workdir / "superlink.db"),
            "--disable-runtime-dependency-installation",
            "--host", self.host, "--port", str(self.port),
        ]
        self.proc = spawn(cmd, env=env, log=self.workdir / "logs" / "superlink.log")
        if not wait_port("127.0.0.1", self.port, timeout, self.proc):
            self.stop()
            raise NetworkError(
                f"SuperLink did not start on {self.host}:{self.port} "
                f"(see {self.workdir / 'logs' / 'superlink.log'})")

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None

    def _client(self) -> ControlHttpClient:
        return ControlHttpClient.from_server_address(
            self.local_address, insecure=False,
            root_certificates=self.tls.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-cli")])

    def _call(self, name: str, request, *, retry: bool = False):  # type: ignore[no-untyped-def]
        """One Control API call. ``retry`` (reads only: they are safe to repeat) rides out a
        hiccup: an HTTP 500 or a refused connection is tried again with backoff for about
        half a minute before it counts as the SuperLink failing."""
        delays = list(RETRY_DELAYS_S) if retry else []
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise SuperLinkDied(f"the SuperLink exited (code {self.proc.returncode}; see "
                                    f"{self.workdir / 'logs' / 'superlink.log'})")
            client = self._client()
            try:
                return getattr(client, name)(request)
            except Exception as err:  # flwr raises httpx/protobuf errors of many kinds
                line = str(err).splitlines()[0] if str(err) else type(err).__name__
                if not delays:
                    tries = len(RETRY_DELAYS_S) + 1 if retry else 1
                    raise NetworkError(f"SuperLink {name} failed"
                                       + (f" {tries} times" if tries > 1 else "")
                                       + f": {line}") from err
                log.warning("SuperLink %s failed (%s); trying again in %.1f s", name, line,
                            delays[0])
                self.sleep(delays.pop(0))
            finally:
                client.close()

    def register_node(self, public_key_pem: bytes, name: str) -> int:
        return int(self._call("RegisterNode", RegisterNodeRequest(
            public_key=public_key_pem, name=name)).node_id)

    def unregister_node(self, node_id: int) -> None:
        self._call("UnregisterNode", UnregisterNodeRequest(node_id=node_id))

    def node_statuses(self) -> dict[int, str]:
        """Flower node id -> status (registered, online, offline, unregistered)."""
        res = self._call("ListNodes", ListNodesRequest())
        return {int(n.node_id): str(n.status) for n in res.nodes_info}

    def start_run(self, run_config: dict[str, str],
                  files: Mapping[str, bytes] | None = None) -> int:
        """Submit a run; ``files`` replaces the FAB's contents (tests submit hostile FABs)."""
        fab_bytes, _ = build_fab_from_files(dict(files or {"pyproject.toml": app_pyproject()}))
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        res = self._call("StartRun", StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto(run_config)))
        return int(res.run_id)

    def run_status(self, run_id: int) -> str:
        """``status:sub_status`` (e.g. ``finished:completed``) of a run."""
        res = self._call("ListRuns", ListRunsRequest(run_id=run_id), retry=True)
        run = res.run_dict[run_id]
        return f"{run.status.status}:{run.status.sub_status}"

    def stop_run(self, run_id: int) -> None:
        self._call("StopRun", StopRunRequest(run_id=run_id))

    def unfinished_runs(self) -> list[int]:
        """Runs the SuperLink's database holds as not finished: after a coordinator crash,
        the run its dead ServerApp served (its queued messages would still reach nodes)."""
        res = self._call("ListRuns", ListRunsRequest(), retry=True)
        return sorted(int(rid) for rid, run in res.run_dict.items()
                      if run.status.status != "finished")

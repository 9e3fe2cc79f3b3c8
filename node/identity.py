"""The node's home: its one EC key (SuperNode auth *and* update signatures) and enrollment.

Layout of ``home`` (default ``~/.atom-node``)::

    node.key        OpenSSH-format EC private key, mode 0600
    node.json       enrollment: node id, coordinator + fleet addresses, run id
    ca.pem          the coordinator's CA, pinned at join (its SHA-256 came in the invite)
    coordinator.pem the coordinator's receipt-signing public key, pinned at join
    progress.json   what the warm worker is doing now (read by the join supervisor)
    blobs/          the blob cache (node.blobs)
    logs/           supernode.log, worker.log (one ``lease {...}`` timing line per lease)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from protocol.errors import ConfigError
from protocol.signing import generate_key, load_private_key, save_private_key

__all__ = ["Enrollment", "NodeHome", "default_home"]


def default_home() -> Path:
    return Path(os.environ.get("ATOM_NODE_HOME", Path.home() / ".atom-node"))


@dataclass(frozen=True)
class Enrollment:
    node_id: int
    flower_node_id: str
    name: str
    institution: str
    run_id: str
    coordinator_address: str
    fleet_address: str


@dataclass(frozen=True)
class NodeHome:
    path: Path

    @property
    def key_path(self) -> Path:
        return self.path / "node.key"

    @property
    def ca_path(self) -> Path:
        return self.path / "ca.pem"

    @property
    def coordinator_key_path(self) -> Path:
        return self.path / "coordinator.pem"

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    @property
    def compile_cache_path(self) -> Path:
        """torch.compile's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``) for the worker."""
        return self.path / "compile-cache"

    def key(self):  # type: ignore[no-untyped-def]
        """Load the node key, making one on first use."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.key_path.exists():
                save_private_key(generate_key(), self.key_path)
        except OSError as err:  # --home names a file, a read-only place, ...
            raise ConfigError(f"cannot use {self.path} as the node home: "
                              f"{err.strerror or err}") from None
        return load_private_key(self.key_path)

    def enrollment(self) -> Enrollment | None:
        p = self.path / "node.json"
        if not p.exists():
            return None
        try:
            e = Enrollment(**json.loads(p.read_text()))
            # wrong types would only fail later, deep in the supervisor, as a traceback
            for f in fields(e):
                want = int if f.name == "node_id" else str
                value = getattr(e, f.name)
                if not isinstance(value, want) or isinstance(value, bool):
                    raise TypeError(f"{f.name} must be {want.__name__}, got {value!r}")
            return e
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{p} is corrupt ({err}); remove it to enroll again") from None
        except OSError as err:  # a directory, no permission, ...
            raise ConfigError(f"cannot read {p}: {err.strerror or err}") from None

    def save_enrollment(self, e: Enrollment, ca_pem: bytes, coordinator_pem: bytes) -> None:
        self.ca_path.write_bytes(ca_pem)
        self.coordinator_key_path.write_bytes(coordinator_pem)
        tmp = self.path / "node.json.tmp"
        tmp.write_text(json.dumps(asdict(e), indent=2))
        tmp.replace(self.path / "node.json")

"""Revoking invites and nodes, whether the coordinator is running or not.

A revoked node is cut off at three places: the ledger marks it (the run loop stops leasing to
it and the verifier rejects whatever it still sends), and its key is unregistered from the
SuperLink (its SuperNode's next request gets HTTP 401 and it can never reconnect with that
key). ``atom-coordinator revoke-node`` runs in its own process, so it reaches a running
coordinator's SuperLink through the Control API on loopback, at the port the launcher writes to
``DIR/superlink.json`` while it runs; when no coordinator runs, ``Coordinator.start``
unregisters every revoked key it finds still registered before any node can connect.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError, LedgerError, NetworkError

from coordinator.ledger import Ledger
from coordinator.rundir import RunDir
from coordinator.services.superlink import SuperLink

__all__ = [
    "Revoked",
    "clear_superlink_state",
    "revoke_invites",
    "revoke_node",
    "running_superlink",
    "unregister_revoked",
    "write_superlink_state",
]

_GONE = "unregistered"


def _state_path(rd: RunDir) -> Path:
    return rd.path / "superlink.json"


def write_superlink_state(rd: RunDir, port: int) -> None:
    """Record where this coordinator's SuperLink (Control API) listens on loopback."""
    tmp = rd.path / ".superlink.json.tmp"
    tmp.write_text(json.dumps({"control_address": f"127.0.0.1:{port}", "port": port,
                               "pid": os.getpid()}))
    tmp.replace(_state_path(rd))


def clear_superlink_state(rd: RunDir) -> None:
    _state_path(rd).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_superlink(rd: RunDir) -> SuperLink | None:
    """The running coordinator's SuperLink, or None when none runs (or the state is stale)."""
    try:
        state = json.loads(_state_path(rd).read_text())
        port, pid = int(state["port"]), int(state["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: treat as not running; start() reconciles
    if not _alive(pid):
        return None
    return SuperLink(rd.path, rd.tls, "127.0.0.1", port)


def revoke_invites(rd: RunDir, institution: str) -> int:
    """Revoke every unused invite of ``institution``; returns how many."""
    with rd.ledger() as ledger:
        inst = next((i for i in ledger.institutions() if i.name == institution.strip()), None)
        if inst is None:
            raise ConfigError(f"no institution called {institution!r} in this run")
        todo = [i for i in ledger.invites(inst.id) if i.used_at is None and not i.revoked]
        for invite in todo:
            assert invite.id is not None
            ledger.revoke_invite(invite.id)
        if todo:
            ledger.add_event("revoke", f"{len(todo)} unused invite(s) of {inst.name} revoked")
    return len(todo)


@dataclass(frozen=True)
class Revoked:
    node_id: int
    name: str
    flower_node_id: str
    unregistered: bool  # the SuperLink dropped the key now (False: at the next start)


def _unregister(link: SuperLink, flower_id: int) -> None:
    """Unregister ``flower_id`` unless the SuperLink already did."""
    if link.node_statuses().get(flower_id, _GONE) != _GONE:
        link.unregister_node(flower_id)


def revoke_node(rd: RunDir, node_id: int) -> Revoked:
    """Mark ledger node ``node_id`` revoked and, if the coordinator runs, drop its key now."""
    with rd.ledger() as ledger:
        node = ledger.node(node_id)
        if node is None:
            raise LedgerError(f"no node {node_id} in the ledger")
        ledger.revoke_node(node_id)
        ledger.add_event("revoke", f"{node.name} (node {node_id}) revoked", node_id=node_id)
    link = running_superlink(rd)
    unregistered = False
    if link is not None:
        try:
            _unregister(link, int(node.flower_node_id))
            unregistered = True
        except NetworkError:
            pass  # it stopped meanwhile: the next start unregisters the key
    return Revoked(node_id, node.name, node.flower_node_id, unregistered)


def unregister_revoked(ledger: Ledger, link: SuperLink) -> list[int]:
    """Unregister every revoked node's key still registered; returns their Flower ids."""
    statuses = link.node_statuses()
    done = []
    for node in ledger.nodes():
        fid = int(node.flower_node_id)
        if node.revoked and statuses.get(fid, _GONE) != _GONE:
            link.unregister_node(fid)
            done.append(fid)
    return done

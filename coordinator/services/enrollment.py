"""Enrollment: trade a one-time invite secret for a ledger identity and a SuperNode key.

Order matters for "nothing accepted is lost": the invite is redeemed atomically first (so two
nodes racing on one token cannot both get in), then the key is registered with the SuperLink;
if that fails, or the ledger then refuses the node, the registration is undone and the invite
handed back, so the contributor can simply retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import EnrollmentError
from protocol.invite import hash_secret
from protocol.signing import fingerprint, load_public_key

from coordinator.ledger import Ledger

__all__ = ["Enrolled", "Enroller"]

_MAX_NAME = 64


@dataclass(frozen=True)
class Enrolled:
    node_id: int
    flower_node_id: str
    institution: str


@dataclass
class Enroller:
    ledger: Ledger
    register: Callable[[bytes, str], int]  # (PEM SPKI, name) -> Flower node id
    # Flower node id -> None; withdraws a key whose ledger row could not be written (without
    # it the SuperLink would refuse that key forever: "public key already in use").
    unregister: Callable[[int], None] | None = None

    def enroll(self, secret: str, public_key_pem: bytes, name: str) -> Enrolled:
        name = name.strip()
        if not name or len(name) > _MAX_NAME or not name.isprintable():
            raise EnrollmentError(f"node name must be 1-{_MAX_NAME} printable characters")
        try:
            load_public_key(public_key_pem)
        except Exception:  # any parse failure of foreign bytes is the caller's mistake
            raise EnrollmentError("public key is not a PEM EC public key") from None
        fp = fingerprint(public_key_pem)
        if self.ledger.node_by_fingerprint(fp) is not None:
            raise EnrollmentError("this key is already enrolled: run `atom-node join` "
                                  "from the home where it enrolled, or use a new key")
        invite = self.ledger.redeem_invite(hash_secret(secret), time.time())
        try:
            flower_id = self.register(public_key_pem, name)
        except Exception:  # whatever failed, no node exists: the token stays good
            self.ledger.release_invite(invite.id)
            raise
        try:
            inst = {i.id: i.name for i in self.ledger.institutions()}[invite.institution_id]
            node = self.ledger.add_node(flower_id, name, invite.institution_id, public_key_pem,
                                        fp)
        except Exception:
            try:
                if self.unregister is not None:
                    self.unregister(flower_id)
            finally:
                self.ledger.release_invite(invite.id)
            raise
        self.ledger.mark_invite_used(invite.id, node.id)
        self.ledger.add_event("join", f"{name} ({inst}) enrolled as node {node.id}",
                              node_id=node.id)
        return Enrolled(node_id=node.id, flower_node_id=str(flower_id), institution=inst)

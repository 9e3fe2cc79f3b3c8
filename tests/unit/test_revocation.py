"""Revoking invites and nodes: the CLI commands, the ledger, the SuperLink, the run loop."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_run_loop import (  # noqa: F401  (fixtures)
    corpus, network, nets, one_torch_thread,
)
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.ledger import Ledger
from coordinator.services import revocation
from coordinator.services.revocation import (
    clear_superlink_state, revoke_invites, revoke_node, running_superlink, unregister_revoked,
    write_superlink_state,
)
from coordinator.rundir import RunDir, create_invite, init_run
from coordinator.verify.reply import Expected, verify
from protocol.digest import digest_arrays
from protocol.errors import ConfigError, EnrollmentError, Reason
from protocol.invite import InviteToken, hash_secret
from protocol.messages import EVAL_WINDOWS, Lease, Update, UpdateMetrics
from protocol.signing import fingerprint, generate_key, public_key_pem, sign_update

runner = CliRunner()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_run(tmp_path_factory.mktemp("tpl") / "run").path


@pytest.fixture
def rd(template: Path, tmp_path: Path) -> RunDir:
    """A fresh run directory (a copy of one ``init``: keys and PKI take a while)."""
    import shutil

    shutil.copytree(template, tmp_path / "run")
    return RunDir(tmp_path / "run")


def _secret(token: str) -> str:
    return InviteToken.decode(token).secret


def _add_node(ledger: Ledger, name: str, flower_id: int, inst: str = "Uni A") -> int:
    i = ledger.add_institution(inst)
    pem = public_key_pem(generate_key())
    node = ledger.add_node(flower_id, name, i.id, pem, fingerprint(pem))
    assert node.id is not None
    return node.id


@dataclass
class FakeLink:
    """The SuperLink's Control API as revocation uses it."""

    statuses: dict[int, str]
    unregistered: list[int] = field(default_factory=list)

    def node_statuses(self) -> dict[int, str]:
        return dict(self.statuses)

    def unregister_node(self, node_id: int) -> None:
        self.unregistered.append(node_id)
        self.statuses[node_id] = "unregistered"


# -- invites --------------------------------------------------------------------------------

def test_revoke_invite_revokes_only_unused_invites_of_that_institution(rd: RunDir) -> None:
    used, unused1, unused2 = (create_invite(rd, "Uni A") for _ in range(3))
    other = create_invite(rd, "Uni B")
    with rd.ledger() as led:
        led.redeem_invite(hash_secret(_secret(used)), time.time())
    assert revoke_invites(rd, "Uni A") == 2
    assert revoke_invites(rd, "Uni A") == 0  # idempotent
    with rd.ledger() as led:
        for token in (unused1, unused2):
            with pytest.raises(EnrollmentError, match="revoked"):
                led.redeem_invite(hash_secret(_secret(token)), time.time())
        led.redeem_invite(hash_secret(_secret(other)), time.time())  # Uni B untouched
        assert any(e.kind == "revoke" for e in led.events())


def test_revoke_invite_of_an_unknown_institution_is_a_config_error(rd: RunDir) -> None:
    with pytest.raises(ConfigError, match="no institution called 'Nowhere'"):
        revoke_invites(rd, "Nowhere")


def test_revoke_invite_cli(rd: RunDir) -> None:
    token = create_invite(rd, "Uni A")
    res = runner.invoke(app, ["revoke-invite", str(rd.path), "--institution", "Uni A"])
    assert res.exit_code == 0, res.output
    assert "revoked 1 unused invite(s) of Uni A" in res.output
    with rd.ledger() as led, pytest.raises(EnrollmentError, match="revoked"):
        led.redeem_invite(hash_secret(_secret(token)), time.time())
    res = runner.invoke(app, ["revoke-invite", str(rd.path), "--institution", "Nowhere"])
    assert res.exit_code == 2 and "error: no institution called 'Nowhere'" in res.output


# -- nodes ----------------------------------------------------------------------------------

def test_revoke_node_while_the_coordinator_is_down_marks_the_ledger(rd: RunDir) -> None:
    with rd.ledger() as led:
        nid = _add_node(led, "gpu-1", 77)
    r = revoke_node(rd, nid)
    assert (r.node_id, r.name, r.flower_node_id, r.unregistered) == (nid, "gpu-1", "77", False)
    with rd.ledger() as led:
        assert led.node(nid).revoked
        assert any(e.kind == "revoke" and e.node_id == nid for e in led.events())


def test_revoke_node_while_running_unregisters_the_key_now(
        rd: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    with rd.ledger() as led:
        nid = _add_node(led, "gpu-1", 77)
    link = FakeLink({77: "online"})
    monkeypatch.setattr(revocation, "running_superlink", lambda _rd: link)
    assert revoke_node(rd, nid).unregistered
    assert link.unregistered == [77]
    revoke_node(rd, nid)  # again: the SuperLink already dropped it, nothing to call
    assert link.unregistered == [77]


def test_revoke_node_cli(rd: RunDir) -> None:
    with rd.ledger() as led:
        nid = _add_node(led, "gpu-1", 77)
    res = runner.invoke(app, ["revoke-node", str(rd.path), str(nid)])
    assert res.exit_code == 0, res.output
    assert f"revoked node {nid} (gpu-1)" in res.output and "next starts" in res.output
    res = runner.invoke(app, ["revoke-node", str(rd.path), "999"])
    assert res.exit_code == 7 and "error: no node 999 in the ledger" in res.output


def test_superlink_state_file_finds_only_a_live_coordinator(rd: RunDir) -> None:
    assert running_superlink(rd) is None
    write_superlink_state(rd, 4567)
    link = running_superlink(rd)
    assert link is not None and link.local_address == "127.0.0.1:4567"
    state = json.loads((rd.path / "superlink.json").read_text())
    (rd.path / "superlink.json").write_text(json.dumps(dict(state, pid=2**22 + 12345)))
    assert running_superlink(rd) is None  # stale: that process is gone
    (rd.path / "superlink.json").write_text("{torn")
    assert running_superlink(rd) is None
    clear_superlink_state(rd)
    assert not (rd.path / "superlink.json").exists()


def test_start_unregisters_keys_revoked_while_down(rd: RunDir) -> None:
    with rd.ledger() as led:
        keep = _add_node(led, "keep", 1)
        gone = _add_node(led, "gone", 2)
        done = _add_node(led, "done", 3)
        led.revoke_node(gone)
        led.revoke_node(done)
        link = FakeLink({1: "online", 2: "offline", 3: "unregistered"})
        assert unregister_revoked(led, link) == [2]  # type: ignore[arg-type]
        assert link.unregistered == [2] and keep


# -- judging ---------------------------------------------------------------------------------

NOW = 1_700_000_000.0


def test_verifier_rejects_a_revoked_nodes_valid_update() -> None:
    key = generate_key()
    lease = Lease(run_id="r", round=1, shard_id=0, kind="eval", base_version=0,
                  base_digest="a" * 64, data_start=0, data_end=100, data_digest="b" * 64,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  inner_steps=0, batch_size=1, seq_len=8, lr=0.0, weight_decay=0.0, seed=0,
                  deadline=NOW + 60, nonce="c" * 32)
    windows = {EVAL_WINDOWS: np.array([2.0 * 8] * 12 + [2.0 * 3])}  # 99 predictions
    update = sign_update(Update(lease=lease, node_id=3, arrays_digest=digest_arrays(windows),
                                metrics=UpdateMetrics(99, 0, 2.0, 2.0, 1.0)), key)
    exp = Expected(lease=lease, node_id=3, public_key_pem=public_key_pem(key),
                   current_version=0, shapes={}, max_norm=10.0, now=NOW)
    assert verify(update, windows, exp).accepted
    verdict = verify(update, windows, dataclasses.replace(exp, revoked=True))
    assert (verdict.accepted, verdict.reason, verdict.detail) == (
        False, Reason.UNKNOWN_NODE, "node 3 is revoked")


def test_revocation_mid_run_rejects_the_pending_update_and_ends_the_nodes_leases(
        network) -> None:  # noqa: F811
    net = network(["honest", "honest"], rounds=2)
    led, transport = net.ledger, net.transport
    good, bad = net.nodes
    send = transport._send_one  # noqa: SLF001 - one message of a pass

    def send_then_revoke(dst: int, kind: str, content: Any, ttl: float) -> str:
        mid = send(dst, kind, content, ttl)
        if dst == bad.flower_id:
            led.revoke_node(bad.id)  # revoked while its lease is out
        return mid

    transport._send_one = send_then_revoke  # type: ignore[method-assign]  # noqa: SLF001
    net.run()
    bad_leases = led.leases(node_id=bad.id)
    # the ones out when it was revoked (its train lease and the evaluation queued behind
    # it, sent together), nothing after
    assert sorted(lease.kind for lease in bad_leases) == ["eval", "train"]
    upds = led.updates(node_id=bad.id)
    assert len(upds) == 2
    for upd in upds:
        assert (upd.verdict, upd.reason) == ("rejected", Reason.UNKNOWN_NODE)
        assert "revoked" in upd.detail
    assert led.credits(node_id=bad.id) == []
    assert [v.version for v in led.versions()] == [0, 1, 2]  # the run went on
    assert all(u.verdict == "accepted" for u in led.updates(node_id=good.id))

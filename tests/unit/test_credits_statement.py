"""``atom-node credits`` against the real coordinator service: the statement agrees with the
ledger, only a node's own key gets its statement, a bad receipt from the coordinator fails the
whole statement, user mistakes are one line. The coordinator side is ``credits_world``."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from credits_world import TRAIN_TOKENS, World, credits, make_world, ok_json, one_line_failure
from sqlalchemy import create_engine, text

from node.credits import fetch_statement
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.processes import free_port
from protocol.receipts import statement_request_bytes
from protocol.signing import load_private_key, sign


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with make_world(tmp_path) as w:
        yield w


# -- the statement agrees with the ledger ---------------------------------------------------

def test_statement_agrees_with_the_ledger(world: World) -> None:
    summaries = {s.node_id: s for s in world.ledger.node_summaries()}
    for name in ("a", "b", "c"):
        doc = ok_json("--home", world.homes[name].path)
        s = summaries[world.ids[name]]
        assert doc["node_id"] == s.node_id
        assert doc["total"] == {"updates": s.accepted, "tokens_trained": s.tokens,
                                "tokens_evaluated": s.eval_tokens, "penalties": 0,
                                "credits": pytest.approx(s.credits, abs=1e-9)}
    a = ok_json("--home", world.homes["a"].path)
    assert a["total"]["updates"] == 3 and summaries[world.ids["a"]].rejected == 2
    assert a["by_kind"] == [
        {"run_id": "credits-test", "kind": "train", "updates": 2, "tokens": 2 * TRAIN_TOKENS,
         "credits": pytest.approx(2 * TRAIN_TOKENS / 1000 * 1.0)},
        {"run_id": "credits-test", "kind": "eval", "updates": 1, "tokens": 50,
         "credits": pytest.approx(50 / 1000 * 0.1)}]
    assert a["runs"] == [{"run_id": "credits-test", **a["total"]}]
    assert a["coordinator_key_fingerprint"] == world.issuer.fingerprint


def test_every_receipt_names_the_work_it_pays_for(world: World) -> None:
    statement = fetch_statement(world.homes["a"])
    node_id = world.ids["a"]
    credits_by_update = {c.update_id: c for c in world.ledger.credits(node_id=node_id)}
    updates = {u.id: u for u in world.ledger.updates(node_id=node_id)}
    leases = {lease.id: lease for lease in world.ledger.leases(node_id=node_id)}
    assert sorted(r.receipt.update_id for r in statement.receipts) == sorted(credits_by_update)
    for signed in statement.receipts:
        r = signed.receipt
        credit, upd = credits_by_update[r.update_id], updates[r.update_id]
        lease = leases[upd.lease_id]
        assert (r.amount, r.components) == (credit.amount, credit.components_dict())
        assert (r.update_digest, r.tokens) == (upd.arrays_digest, upd.tokens)
        assert (r.lease_nonce, r.round, r.shard_id, r.kind) == (
            lease.nonce, lease.round, lease.shard_id, lease.kind)
        assert upd.verdict == "accepted"
    late = [u for u in updates.values() if u.reason == "late"]
    assert len(late) == 1 and late[0].id not in credits_by_update


def test_table_output(world: World) -> None:
    result = credits("--home", world.homes["a"].path)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "credits of node 1" in out and "3 receipts verified" in out
    assert "credits-test" in out and "total" in out
    assert f"{2 * TRAIN_TOKENS / 1000 + 0.005:,.4f}" in out  # 0.064 train + 0.005 eval


# -- who may ask --------------------------------------------------------------------------

def _ask(world: World, node_id: int, key_of: str, ts: float | None = None) -> grpc.RpcError:
    ts = time.time() if ts is None else ts
    key = load_private_key(world.homes[key_of].key_path)
    req = pb.StatementRequest(node_id=node_id, timestamp=ts,
                              signature=sign(key, statement_request_bytes(node_id, ts)))
    creds = grpc.ssl_channel_credentials(root_certificates=world.rd.tls.ca_cert.read_bytes())
    with grpc.secure_channel(world.address, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).GetCreditStatement(req, timeout=10)
    return info.value


def test_request_signed_by_another_nodes_key_is_refused(world: World) -> None:
    err = _ask(world, world.ids["a"], key_of="b")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "bad_signature" in err.details()
    err = _ask(world, world.ids["a"], key_of="a", ts=time.time() - 600)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "clock_skew" in err.details()
    err = _ask(world, 999, key_of="a")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown_node" in err.details()
    # the same through the CLI: a home that claims node a but holds node b's key
    fake = world.homes["b"].path.parent / "fake"
    shutil.copytree(world.homes["b"].path, fake)
    enrollment = json.loads((fake / "node.json").read_text())
    (fake / "node.json").write_text(json.dumps({**enrollment, "node_id": world.ids["a"]}))
    code, line = one_line_failure("--home", fake)
    assert code == 5 and "refused the statement request: bad_signature" in line


# -- a coordinator serving a bad receipt --------------------------------------------------

def test_coordinator_serving_a_bad_receipt_fails_online(world: World, tmp_path: Path) -> None:
    engine = create_engine(world.cfg.ledger_url(world.rd.path))
    try:
        with engine.begin() as conn:
            rid, body = conn.execute(text("SELECT id, body FROM credit_receipts WHERE node_id = "
                                          ":n ORDER BY id LIMIT 1"), {"n": world.ids["a"]}).one()
            doc = json.loads(body)
            doc["amount"] = doc["amount"] + 1
            conn.execute(text("UPDATE credit_receipts SET body = :b WHERE id = :i"),
                         {"b": json.dumps(doc), "i": rid})
    finally:
        engine.dispose()
    save = tmp_path / "never.json"
    code, line = one_line_failure("--home", world.homes["a"].path, "--save", save)
    assert code == 4 and line == (f"error: receipt for update {doc['update_id']} does not "
                                  "verify: bad_signature")
    assert not save.exists()  # a statement that does not verify is not kept


# -- user mistakes ----------------------------------------------------------------------------

def test_mistakes_are_one_line(world: World, tmp_path: Path) -> None:
    code, line = one_line_failure("--home", tmp_path / "empty")
    assert code == 2 and "no coordinator key pinned" in line
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only", garbage)
    assert code == 3 and "not a credit statement" in line
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only",
                                   tmp_path / "absent.json")
    assert code == 2 and "cannot read statement" in line
    # a coordinator that is not there
    away = tmp_path / "away"
    shutil.copytree(world.homes["a"].path, away)
    enrollment = json.loads((away / "node.json").read_text())
    (away / "node.json").write_text(json.dumps(
        {**enrollment, "coordinator_address": f"127.0.0.1:{free_port()}"}))
    code, line = one_line_failure("--home", away)
    assert code == 8 and "cannot get the statement" in line



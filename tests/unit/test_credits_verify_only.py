"""``atom-node credits --verify-only``: saved statements checked offline; a tampered amount, a
receipt for another node, a receipt signed by another key, a duplicate are each one line and a
non-zero exit. The coordinator side is ``credits_world``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from credits_world import World, credits, make_world, ok_json, one_line_failure

from coordinator.accounting.credits import ReceiptIssuer
from protocol.receipts import Statement, seal_statement, sign_receipt
from protocol.signing import generate_key, public_key_pem


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with make_world(tmp_path) as w:
        yield w


def _saved(world: World, tmp_path: Path, name: str) -> tuple[Path, dict]:
    path = tmp_path / f"{name}.json"
    online = ok_json("--home", world.homes[name].path, "--save", path)
    return path, online


def test_verify_only_on_a_saved_statement(world: World, tmp_path: Path) -> None:
    path, online = _saved(world, tmp_path, "a")
    assert ok_json("--home", world.homes["a"].path, "--verify-only", path) == online
    # a third party without a node home: the coordinator key named explicitly
    key = tmp_path / "coordinator.pem"
    key.write_bytes(world.rd.public_key_pem())
    assert ok_json("--home", tmp_path / "nobody", "--verify-only", path,
                    "--coordinator-key", key) == online
    code, line = one_line_failure("--home", tmp_path / "nobody", "--verify-only", path)
    assert code == 2 and "--coordinator-key" in line


def _rewrite(path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    doc = json.loads(path.read_text())
    change(doc)
    out = path.with_name("changed-" + path.name)
    out.write_text(json.dumps(doc))
    return out


def test_tampered_amount_is_one_line_and_non_zero(world: World, tmp_path: Path) -> None:
    path, _ = _saved(world, tmp_path, "a")
    doc = json.loads(path.read_text())
    victim = doc["receipts"][1]["receipt"]

    def inflate(d: dict) -> None:
        d["receipts"][1]["receipt"]["amount"] = victim["amount"] * 10

    code, line = one_line_failure("--home", world.homes["a"].path,
                                   "--verify-only", _rewrite(path, inflate))
    assert code == 4
    assert line == f"error: receipt for update {victim['update_id']} does not verify: bad_signature"


def test_receipt_for_another_node_is_rejected(world: World, tmp_path: Path) -> None:
    a_path, _ = _saved(world, tmp_path, "a")
    b_path, _ = _saved(world, tmp_path, "b")
    b_receipt = json.loads(b_path.read_text())["receipts"][0]
    changed = _rewrite(a_path, lambda d: d["receipts"].append(b_receipt))
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only", changed)
    assert code == 4 and line == (f"error: receipt for update {b_receipt['receipt']['update_id']}"
                                  " does not verify: wrong_node")


def test_receipt_signed_by_another_key_is_rejected(world: World, tmp_path: Path) -> None:
    path, _ = _saved(world, tmp_path, "a")
    statement = Statement.from_json(path.read_text())
    mallory = generate_key()
    first = statement.receipts[0].receipt
    forged = sign_receipt(replace(first, coordinator_key_fingerprint=ReceiptIssuer(mallory)
                                  .fingerprint), mallory)
    changed = tmp_path / "forged.json"
    changed.write_text(replace(statement, receipts=[forged, *statement.receipts[1:]]).to_json())
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only", changed)
    assert code == 4 and line == (f"error: receipt for update {first.update_id} does not "
                                  "verify: bad_signature")
    # a genuine statement checked against another key fails the same way
    other = tmp_path / "mallory.pem"
    other.write_bytes(public_key_pem(mallory))
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only", path,
                                   "--coordinator-key", other)
    assert code == 4 and line.endswith("does not verify: bad_signature")


def test_duplicate_receipt_is_rejected(world: World, tmp_path: Path) -> None:
    path, _ = _saved(world, tmp_path, "a")
    changed = _rewrite(path, lambda d: d["receipts"].append(d["receipts"][0]))
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only", changed)
    assert code == 4 and line.endswith("appears twice: duplicate")




def test_a_penalty_shows_apart_and_lowers_the_total(world: World, tmp_path: Path) -> None:
    # the coordinator's signed penalty for an update that lost a spot check, in a statement
    path, online = _saved(world, tmp_path, "a")
    st = Statement.from_json(path.read_text())
    first = st.receipts[0].receipt
    penalty = replace(first, update_id=10_000, kind="penalty", tokens=0, amount=-0.32,
                      components={"kind": "penalty", "reason": "spot_check_mismatch",
                                  "tokens": 32, "rate_per_1k": 1.0, "factor": 10.0})
    changed = tmp_path / "with-penalty.json"
    sealed = seal_statement(st.node_id, st.run_id, [*st.receipts, world.issuer.issue(penalty)],
                            world.issuer.key, st.issued_at + 1)
    changed.write_text(sealed.to_json())
    report = ok_json("--home", world.homes["a"].path, "--verify-only", changed)
    assert report["total"]["penalties"] == 1
    assert report["total"]["updates"] == online["total"]["updates"]
    assert report["total"]["credits"] == pytest.approx(online["total"]["credits"] - 0.32)
    assert report["receipts_verified"] == online["receipts_verified"] + 1
    assert report["by_kind"][-1] == {"run_id": first.run_id, "kind": "penalty", "updates": 1,
                                     "tokens": 0, "credits": -0.32}
    result = credits("--home", world.homes["a"].path, "--verify-only", changed)
    assert result.exit_code == 0, result.stderr
    assert "penalty" in result.stdout and "lost a spot or eval check" in result.stdout

    # ... and the penalty cannot be dropped from the saved statement: the seal breaks
    doc = json.loads(changed.read_text())
    doc["receipts"] = doc["receipts"][:-1]
    dropped = tmp_path / "penalty-dropped.json"
    dropped.write_text(json.dumps(doc))
    code, line = one_line_failure("--home", world.homes["a"].path, "--verify-only", dropped)
    assert code == 4 and "seal does not verify" in line and "removed" in line

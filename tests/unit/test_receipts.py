"""Credit receipts: the signed bytes, sign/verify, the refusals, statements as JSON."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import ProtocolError, VerificationError
from protocol.receipts import (
    Receipt,
    SignedReceipt,
    Statement,
    receipt_bytes,
    seal_statement,
    sign_receipt,
    statement_request_bytes,
    statement_seal_bytes,
    verify_receipt,
)
from protocol.signing import fingerprint, generate_key, public_key_pem, sign


@pytest.fixture(scope="module")
def coordinator() -> ec.EllipticCurvePrivateKey:
    return generate_key()


@pytest.fixture(scope="module")
def mallory() -> ec.EllipticCurvePrivateKey:
    return generate_key()


def make_receipt(key: ec.EllipticCurvePrivateKey | None = None, **over: Any) -> Receipt:
    values: dict[str, Any] = dict(
        run_id="run-1", node_id=7, update_id=17, update_digest="c" * 64, lease_nonce="f" * 32,
        round=2, shard_id=5, kind="train", tokens=4096, amount=4.096,
        components={"kind": "train", "tokens": 4096, "rate_per_1k": 1.0},
        issued_at=1_700_000_000.25,
        coordinator_key_fingerprint=fingerprint(public_key_pem(key)) if key else "0" * 16)
    values.update(over)
    return Receipt(**values)


def _reason(signed: SignedReceipt, pem: bytes, node_id: int = 7) -> str:
    with pytest.raises(VerificationError) as info:
        verify_receipt(signed, pem, node_id)
    assert "\n" not in str(info.value)
    return info.value.reason


def test_receipt_bytes_known_answer() -> None:
    r = make_receipt(amount=4, issued_at=1_700_000_000, run_id="r\u00e9")  # ints become floats
    assert receipt_bytes(r) == (
        b"atom-receipt-v1\n"
        b'{"amount":4.0,"components":{"kind":"train","rate_per_1k":1.0,"tokens":4096},'
        b'"coordinator_key_fingerprint":"0000000000000000","issued_at":1700000000.0,'
        b'"kind":"train","lease_nonce":"ffffffffffffffffffffffffffffffff","node_id":7,'
        b'"round":2,"run_id":"r\\u00e9","shard_id":5,"tokens":4096,'
        b'"update_digest":"' + b"c" * 64 + b'","update_id":17}')


MANIFEST = "d" * 64  # a run's data manifest digest, as its leases name it


def test_a_receipt_names_its_data_manifest(coordinator) -> None:
    r = make_receipt(coordinator, data_manifest=MANIFEST)
    data = receipt_bytes(r)
    assert b'"coordinator_key_fingerprint":"' in data
    assert b'","data_manifest":"' + MANIFEST.encode() + b'","issued_at":' in data  # sorted
    signed = sign_receipt(r, coordinator)
    back = SignedReceipt.from_dict(json.loads(json.dumps(signed.to_dict())))
    assert back == signed and back.receipt.data_manifest == MANIFEST
    verify_receipt(back, public_key_pem(coordinator), 7)


def test_a_receipt_from_before_data_manifests_still_verifies(coordinator) -> None:
    """An old ledger's receipt: no ``data_manifest`` key, signed over the old bytes."""
    doc = make_receipt(coordinator).to_dict()
    assert "data_manifest" not in doc
    old = b"atom-receipt-v1\n" + json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=True).encode()
    signed = SignedReceipt.from_dict({"receipt": doc, "signature": base64.b64encode(
        sign(coordinator, old)).decode()})
    assert signed.receipt.data_manifest == "" and receipt_bytes(signed.receipt) == old
    verify_receipt(signed, public_key_pem(coordinator), 7)
    assert "data_manifest" not in signed.to_dict()["receipt"]


def test_the_data_manifest_is_signed(coordinator, mallory) -> None:
    pem = public_key_pem(coordinator)
    signed = sign_receipt(make_receipt(coordinator, data_manifest=MANIFEST), coordinator)
    for receipt in (dataclasses.replace(signed.receipt, data_manifest="e" * 64),
                    dataclasses.replace(signed.receipt, data_manifest="")):  # dropped
        assert _reason(SignedReceipt(receipt, signed.signature), pem) == "bad_signature"
    old = sign_receipt(make_receipt(coordinator), coordinator)  # added to an old receipt
    added = dataclasses.replace(old.receipt, data_manifest=MANIFEST)
    assert _reason(SignedReceipt(added, old.signature), pem) == "bad_signature"
    r = signed.receipt  # the coordinator's key named, mallory's signature
    assert _reason(SignedReceipt(r, sign(mallory, receipt_bytes(r))), pem) == "bad_signature"


@pytest.mark.parametrize("value", ["", "D" * 64, "d" * 63, 7])
def test_a_malformed_data_manifest_is_refused(coordinator, value: Any) -> None:
    doc = make_receipt(coordinator, data_manifest=MANIFEST).to_dict()
    doc["data_manifest"] = value
    with pytest.raises(ProtocolError, match="data_manifest"):
        Receipt.from_dict(doc)


def test_statement_request_bytes_known_answer() -> None:
    assert statement_request_bytes(3, 1_700_000_000.5) == (
        b'atom-statement-request-v1\n{"node_id":3,"timestamp":1700000000.5}')
    assert statement_request_bytes(3, 1_700_000_000) == (
        b'atom-statement-request-v1\n{"node_id":3,"timestamp":1700000000.0}')
    with pytest.raises(ProtocolError):
        statement_request_bytes(3, float("nan"))


def test_sign_and_verify(coordinator) -> None:
    pem = public_key_pem(coordinator)
    signed = sign_receipt(make_receipt(coordinator), coordinator)
    verify_receipt(signed, pem, 7)
    verify_receipt(signed, pem.decode(), 7)  # str PEM too


def test_tampered_amount_is_rejected(coordinator) -> None:
    signed = sign_receipt(make_receipt(coordinator), coordinator)
    forged = SignedReceipt(dataclasses.replace(signed.receipt, amount=40.96), signed.signature)
    assert _reason(forged, public_key_pem(coordinator)) == "bad_signature"
    # any other field, too: the receipt cannot be moved to another update
    moved = SignedReceipt(dataclasses.replace(signed.receipt, update_id=18), signed.signature)
    assert _reason(moved, public_key_pem(coordinator)) == "bad_signature"


def test_receipt_for_another_node_is_rejected(coordinator) -> None:
    signed = sign_receipt(make_receipt(coordinator, node_id=8), coordinator)
    assert _reason(signed, public_key_pem(coordinator), node_id=7) == "wrong_node"
    verify_receipt(signed, public_key_pem(coordinator), 8)


def test_receipt_signed_by_another_key_is_rejected(coordinator, mallory) -> None:
    pem = public_key_pem(coordinator)
    own = sign_receipt(make_receipt(mallory), mallory)  # names mallory's key honestly
    assert _reason(own, pem) == "bad_signature"
    # claims the coordinator's key, signed by mallory
    r = make_receipt(coordinator)
    forged = SignedReceipt(r, sign(mallory, receipt_bytes(r)))
    assert _reason(forged, pem) == "bad_signature"
    assert _reason(SignedReceipt(r, b"not a DER signature"), pem) == "bad_signature"


def test_sign_receipt_refuses_a_receipt_naming_another_key(coordinator, mallory) -> None:
    with pytest.raises(ProtocolError, match="signing key"):
        sign_receipt(make_receipt(mallory), coordinator)


def test_a_penalty_receipt_is_negative_and_verifies(coordinator) -> None:
    r = make_receipt(coordinator, kind="penalty", tokens=0, amount=-40.96, components={
        "kind": "penalty", "reason": "spot_check_mismatch", "tokens": 4096,
        "rate_per_1k": 1.0, "factor": 10.0})
    signed = sign_receipt(r, coordinator)
    verify_receipt(signed, public_key_pem(coordinator), 7)
    assert b'"amount":-40.96' in receipt_bytes(r) and b'"kind":"penalty"' in receipt_bytes(r)


@pytest.mark.parametrize("over", [dict(amount=float("nan")), dict(node_id="7"),
                                  dict(kind="infer"), dict(tokens=True),
                                  dict(amount=-4.096), dict(kind="penalty", amount=0.0),
                                  dict(kind="penalty", amount=40.96),
                                  dict(components={"x": object()}), dict(components=[1])])
def test_malformed_receipt_is_rejected(coordinator, over: dict) -> None:
    r = make_receipt(coordinator, **over)
    with pytest.raises(ProtocolError):
        receipt_bytes(r)
    assert _reason(SignedReceipt(r, b"x"), public_key_pem(coordinator)) == "malformed"


def test_statement_json_round_trip(coordinator) -> None:
    receipts = [sign_receipt(make_receipt(coordinator, update_id=i, kind=k), coordinator)
                for i, k in ((1, "train"), (2, "eval"))]
    st = seal_statement(7, "run-1", receipts, coordinator, 1_700_000_500.5)
    text = st.to_json()
    back = Statement.from_json(text)
    assert back == st and back.to_json() == text
    for signed in back.receipts:
        verify_receipt(signed, public_key_pem(coordinator), 7)
    assert back.seal_verifies(public_key_pem(coordinator))
    doc = json.loads(text)
    assert doc["format"] == "atom-statement-v2" and doc["issued_at"] == 1_700_000_500.5
    assert base64.b64decode(doc["receipts"][0]["signature"]) == receipts[0].signature
    # Python's json round trip rebuilds the signed bytes exactly (what the README relies on)
    raw = doc["receipts"][1]["receipt"]
    rebuilt = b"atom-receipt-v1\n" + json.dumps(raw, sort_keys=True, separators=(",", ":"),
                                                ensure_ascii=True, allow_nan=False).encode()
    assert rebuilt == receipt_bytes(receipts[1].receipt)


def test_statement_from_json_refusals(coordinator) -> None:
    good = json.loads(seal_statement(7, "r", [sign_receipt(make_receipt(coordinator),
                                                           coordinator)],
                                     coordinator, 1.0).to_json())
    for text, match in [("{", "invalid JSON"), ("[]", "not a credit statement"),
                        (json.dumps({**good, "format": "other"}), "not a credit statement"),
                        (json.dumps({**good, "extra": 1}), "unexpected field 'extra'"),
                        (json.dumps({**good, "node_id": "7"}), "node_id"),
                        (json.dumps({**good, "issued_at": "now"}), "issued_at"),
                        (json.dumps({**good, "seal": "!!"}), "seal: not base64")]:
        with pytest.raises(ProtocolError, match=match):
            Statement.from_json(text)
    bad = json.loads(json.dumps(good))
    bad["receipts"][0]["receipt"]["amount"] = "lots"
    with pytest.raises(ProtocolError, match="^receipt for update 17 is malformed"):
        Statement.from_json(json.dumps(bad))
    bad["receipts"][0] = {"receipt": {}, "signature": "!!"}
    with pytest.raises(ProtocolError, match="^receipt #1 of the statement is malformed"):
        Statement.from_json(json.dumps(bad))


def test_the_seal_covers_every_receipt_in_order(coordinator, mallory) -> None:
    pem = public_key_pem(coordinator)
    receipts = [sign_receipt(make_receipt(coordinator, update_id=i), coordinator)
                for i in (1, 2, 3)]
    st = seal_statement(7, "run-1", receipts, coordinator, 5.0)
    assert st.seal_verifies(pem) and not st.seal_verifies(public_key_pem(mallory))
    for changed in (dict(receipts=receipts[:2]),  # a receipt dropped (a penalty, say)
                    dict(receipts=receipts[::-1]), dict(receipts=[*receipts, receipts[0]]),
                    dict(node_id=8), dict(run_id="run-2"), dict(issued_at=6.0),
                    dict(seal=b"junk")):
        assert not dataclasses.replace(st, **changed).seal_verifies(pem), changed
    # the bytes, rebuilt from the module docstring with the standard library
    digests = b"".join(hashlib.sha256(receipt_bytes(r.receipt)).digest() for r in receipts)
    doc = {"issued_at": 5.0, "node_id": 7, "receipts": 3,
           "receipts_sha256": hashlib.sha256(digests).hexdigest(), "run_id": "run-1"}
    assert statement_seal_bytes(7, "run-1", 5.0, receipts) == (
        b"atom-statement-seal-v1\n" + json.dumps(doc, sort_keys=True,
                                                 separators=(",", ":")).encode())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_a_receipt_as_the_readme_says(coordinator, tmp_path: Path) -> None:
    signed = sign_receipt(make_receipt(coordinator), coordinator)
    doc = json.loads(seal_statement(7, "r", [signed], coordinator, 1.0).to_json())
    entry = doc["receipts"][0]
    body = json.dumps(entry["receipt"], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)
    (tmp_path / "receipt.bin").write_bytes(b"atom-receipt-v1\n" + body.encode())
    (tmp_path / "receipt.sig").write_bytes(base64.b64decode(entry["signature"]))
    (tmp_path / "coordinator.pem").write_bytes(public_key_pem(coordinator))
    cmd = ["openssl", "dgst", "-sha256", "-verify", "coordinator.pem",
           "-signature", "receipt.sig", "receipt.bin"]
    ok = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    (tmp_path / "receipt.bin").write_bytes(b"atom-receipt-v1\n" + body.replace(
        '"amount":4.096', '"amount":40.96').encode())
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coordinator.verify.reply import Expected, verify as verify_reply
from protocol.digest import digest_arrays
from protocol.errors import ConfigError, ProtocolError, Reason
from protocol.messages import Lease, Update, UpdateMetrics
from protocol.signing import (
    fingerprint,
    generate_key,
    load_private_key,
    public_key_openssh,
    public_key_pem,
    save_private_key,
    sign,
    sign_update,
    signed_bytes,
    verify,
    verify_update,
)

ARRAYS = {"w": np.array([[0.5, -0.25]], dtype=np.float32)}


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return generate_key()


def make_lease(**over: Any) -> Lease:
    values: dict[str, Any] = dict(
        run_id="run-1", round=1, shard_id=0, kind="train", base_version=4, base_digest="a" * 64,
        data_start=0, data_end=64, data_digest="b" * 64, inner_steps=2, batch_size=2,
        tokenizer_digest="7" * 64, data_manifest="8" * 64,
        seq_len=4, lr=0.001, weight_decay=0.0, seed=1, deadline=1_700_000_000.0,
        nonce="f" * 32)
    values.update(over)
    return Lease(**values)


def make_update(lease: Lease | None = None) -> Update:
    return Update(lease=lease or make_lease(), node_id=3, arrays_digest=digest_arrays(ARRAYS),
                  metrics=UpdateMetrics(tokens=16, steps=2, loss_before=5.5, loss_after=5.0,
                                        wall_s=0.75))


def test_signed_bytes_known_answer() -> None:
    update = Update(lease=make_lease(), node_id=3, arrays_digest="c" * 64,
                    metrics=UpdateMetrics(16, 2, 5.5, 5, 1e-05), signature=b"ignored")
    expected = (
        'atom-update-v1\n{"arrays_digest":"' + "c" * 64 + '","lease":{"base_digest":"'
        + "a" * 64 + '","base_version":4,"batch_size":2,"data_digest":"' + "b" * 64
        + '","data_end":64,"data_manifest":"' + "8" * 64
        + '","data_start":0,"deadline":1700000000.0,"inner_steps":2,'
        '"kind":"train","lr":0.001,"nonce":"' + "f" * 32 + '","round":1,"run_id":"run-1",'
        '"seed":1,"seq_len":4,"shard_id":0,"tokenizer_digest":"' + "7" * 64
        + '","weight_decay":0.0},"metrics":{"loss_after":5.0,'
        '"loss_before":5.5,"steps":2,"tokens":16,"wall_s":1e-05},"node_id":3}')
    assert signed_bytes(update) == expected.encode("ascii")


def test_signed_bytes_rebuilt_with_json_as_documented() -> None:
    update = make_update(make_lease(run_id="lab-ü-\U0001f600"))
    doc = dataclasses.asdict(update)
    del doc["signature"]
    rebuilt = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                         allow_nan=False)
    assert signed_bytes(update) == b"atom-update-v1\n" + rebuilt.encode("ascii")
    assert b"\\u00fc" in signed_bytes(update) and b"\\ud83d\\ude00" in signed_bytes(update)


def test_signed_bytes_ignore_number_spelling_and_signature(key: ec.EllipticCurvePrivateKey
                                                          ) -> None:
    a = make_update(make_lease(lr=1, deadline=np.float64(5.0)))
    b = make_update(make_lease(lr=1.0, deadline=5.0))
    assert signed_bytes(a) == signed_bytes(b)
    assert signed_bytes(sign_update(a, key)) == signed_bytes(a)
    # and the signature survives a record round trip
    signed = sign_update(a, key)
    assert verify_update(Update.from_record(signed.to_record()), public_key_pem(key))


def test_sign_and_verify(key: ec.EllipticCurvePrivateKey) -> None:
    update = make_update()
    signed = sign_update(update, key)
    assert update.signature == b"" and signed.signature
    assert verify_update(signed, public_key_pem(key))
    assert verify_update(signed, public_key_pem(key).decode("ascii"))
    assert not verify_update(update, public_key_pem(key))  # unsigned


@pytest.mark.parametrize("tamper", [
    lambda u: dataclasses.replace(u, metrics=dataclasses.replace(u.metrics, tokens=17)),
    lambda u: dataclasses.replace(u, metrics=dataclasses.replace(u.metrics, loss_after=1.0)),
    lambda u: dataclasses.replace(u, arrays_digest="0" * 64),
    lambda u: dataclasses.replace(u, node_id=4),
    lambda u: dataclasses.replace(u, lease=dataclasses.replace(u.lease, nonce="e" * 32)),
    lambda u: dataclasses.replace(u, signature=u.signature[:-1] + bytes([u.signature[-1] ^ 1])),
], ids=["tokens", "loss", "arrays_digest", "node_id", "nonce", "signature"])
def test_tampered_payload_fails(key: ec.EllipticCurvePrivateKey, tamper: Any) -> None:
    signed = sign_update(make_update(), key)
    assert not verify_update(tamper(signed), public_key_pem(key))


def test_wrong_key_fails(key: ec.EllipticCurvePrivateKey) -> None:
    mallory = generate_key()
    forged = sign_update(make_update(), mallory)
    assert verify_update(forged, public_key_pem(mallory))
    assert not verify_update(forged, public_key_pem(key))


def test_replayed_update_is_valid_but_rejected_as_lease_mismatch(
        key: ec.EllipticCurvePrivateKey) -> None:
    old = sign_update(make_update(make_lease(nonce="1" * 32)), key)
    assert verify_update(old, public_key_pem(key))  # cryptographically fine
    issued_now = make_lease(nonce="2" * 32)
    exp = Expected(lease=issued_now, node_id=3, public_key_pem=public_key_pem(key),
                   current_version=4, shapes={"w": ((1, 2), "float32")}, max_norm=10.0,
                   now=1_600_000_000.0)
    verdict = verify_reply(old, ARRAYS, exp)
    assert (verdict.accepted, verdict.reason) == (False, Reason.LEASE_MISMATCH)
    assert "nonce" in verdict.detail
    fresh = sign_update(make_update(issued_now), key)
    assert verify_reply(fresh, ARRAYS, exp).accepted


@pytest.mark.parametrize("pem", [b"", b"garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"
                                 b"-----END PUBLIC KEY-----\n", None, 42, "\u00fc"])
def test_verify_never_raises_on_garbage_keys(key: ec.EllipticCurvePrivateKey, pem: Any) -> None:
    signed = sign_update(make_update(), key)
    assert verify_update(signed, pem) is False
    assert verify(pem, b"data", sign(key, b"data")) is False


def test_verify_rejects_non_ec_keys_and_garbage_signatures(key: ec.EllipticCurvePrivateKey
                                                           ) -> None:
    rsa_pem = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert verify(rsa_pem, b"data", sign(key, b"data")) is False
    assert verify(public_key_pem(key), b"data", b"not der") is False
    assert verify(public_key_pem(key), b"data", None) is False  # type: ignore[arg-type]
    assert verify(public_key_pem(key), b"data", sign(key, b"data")) is True


def test_unsignable_update_is_a_protocol_error_and_never_verifies(
        key: ec.EllipticCurvePrivateKey) -> None:
    nan = dataclasses.replace(make_update(), metrics=UpdateMetrics(1, 1, float("nan"), 1, 1))
    with pytest.raises(ProtocolError, match="cannot be signed"):
        sign_update(nan, key)
    assert verify_update(nan, public_key_pem(key)) is False
    assert verify_update("not an update", public_key_pem(key)) is False  # type: ignore[arg-type]


def test_key_save_load_round_trip_openssh_0600(tmp_path: Path,
                                               key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "keys" / "node.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        save_private_key(key, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert public_key_pem(loaded) == public_key_pem(key)
    # What Flower's ClientApp does with the same file:
    ssh = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    assert isinstance(ssh, ec.EllipticCurvePrivateKey)
    assert verify(public_key_pem(key), b"d", ssh.sign(b"d", ec.ECDSA(hashes.SHA256())))
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    path.chmod(0o644)
    save_private_key(generate_key(), path)  # overwrite tightens the mode again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_private_key_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="junk.key"):
        load_private_key(tmp_path / "junk.key")
    rsa_key = rsa.generate_private_key(65537, 2048)
    (tmp_path / "rsa.key").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an EC key"):
        load_private_key(tmp_path / "rsa.key")


def test_load_private_key_accepts_pkcs8(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert public_key_pem(load_private_key(tmp_path / "k.pem")) == public_key_pem(key)


def test_public_key_formats_and_fingerprint(key: ec.EllipticCurvePrivateKey) -> None:
    pem = public_key_pem(key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert public_key_pem(key.public_key()) == pem
    assert public_key_openssh(key).startswith(b"ecdsa-sha2-nistp384 ")
    fp = fingerprint(pem)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(pem.decode()) == fp != fingerprint(public_key_pem(generate_key()))
    with pytest.raises(ProtocolError):
        fingerprint(b"garbage")

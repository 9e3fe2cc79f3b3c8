"""What ``atom-coordinator init`` leaves in a run directory, and the command hints the CLI
prints (never wrapped: they are copied from logs)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator import cli
from coordinator.accounting.credits import ReceiptIssuer
from coordinator.cli import app
from coordinator.rundir import RunDir
from protocol.receipts import RECEIPT_PREFIX, Receipt, receipt_bytes
from protocol.signing import load_public_key, public_key_pem


def _receipt(issuer: ReceiptIssuer) -> Receipt:
    return Receipt(run_id="r", node_id=7, update_id=17, update_digest="ab" * 32,
                   lease_nonce="cd" * 16, round=1, shard_id=3, kind="train", tokens=1000,
                   amount=1.0, components={"kind": "train", "tokens": 1000, "rate_per_1k": 1.0},
                   issued_at=1.0, coordinator_key_fingerprint=issuer.fingerprint)


def test_init_publishes_the_public_key_as_pem(tmp_path: Path) -> None:
    d = tmp_path / "run"
    res = CliRunner().invoke(app, ["init", str(d)])
    assert res.exit_code == 0, res.output
    rd = RunDir(d)
    pem = rd.public_key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----") and pem == rd.public_key_pem()
    assert load_public_key(pem) is not None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_a_ledger_receipt_with_the_published_key(tmp_path: Path) -> None:
    # what the README's receipts section says, with the run directory's own files: the
    # ledger's credit_receipts.body / .signature columns and DIR/coordinator.pub.pem
    d = tmp_path / "run"
    assert CliRunner().invoke(app, ["init", str(d)]).exit_code == 0
    rd = RunDir(d)
    signed = ReceiptIssuer.load(rd.key_path).issue(_receipt(ReceiptIssuer.load(rd.key_path)))
    body = receipt_bytes(signed.receipt)[len(RECEIPT_PREFIX):].decode()  # the body column
    column = base64.b64encode(signed.signature).decode()  # the signature column
    (tmp_path / "receipt.bin").write_bytes(RECEIPT_PREFIX + body.encode())
    (tmp_path / "receipt.sig").write_bytes(base64.b64decode(column))
    assert subprocess.run(["openssl", "pkey", "-pubin", "-in", str(rd.public_key_path),
                           "-noout"], capture_output=True).returncode == 0
    out = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(rd.public_key_path),
                          "-signature", "receipt.sig", "receipt.bin"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "Verified OK", out.stderr


def test_init_on_another_ledger_writes_no_sqlite_file(tmp_path: Path) -> None:
    elsewhere = tmp_path / "db" / "ledger.sqlite"
    elsewhere.parent.mkdir()
    d = tmp_path / "run"
    res = CliRunner().invoke(app, ["init", str(d), "--ledger", f"sqlite:///{elsewhere}"])
    assert res.exit_code == 0, res.output
    assert elsewhere.exists() and not (d / "ledger.db").exists()
    assert RunDir(d).config().ledger.url == f"sqlite:///{elsewhere}"


def test_command_hints_are_never_wrapped(tmp_path: Path) -> None:
    d = tmp_path / ("a-rather-long-run-directory-name-" * 3)
    res = CliRunner().invoke(app, ["init", str(d)])  # stderr is no terminal here
    assert res.exit_code == 0, res.output
    want = f"atom-coordinator invite {d} --institution NAME"
    assert len(want) > 80 and any(want in line for line in res.output.splitlines())
    res = CliRunner().invoke(app, ["invite", str(d), "--institution", "Uni A"])
    assert "on the node: atom-node join --token <the token above>" in res.output.splitlines()


def test_the_start_hint_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    address = "coordinator.some-university-with-a-long-name.example.edu:9093"
    cli.say_command(f"run atom-run (Flower run 123456789) — nodes join with "
                    f"`atom-node join {address} --token <invite>`")
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(f"`atom-node join {address} --token <invite>`") and len(line) > 80

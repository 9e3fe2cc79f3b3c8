"""Opening ledgers: bad URLs, read-only ledgers, SQLite settings for a reader beside a writer."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.ledger import Ledger
from coordinator.ledger.models import TABLES
from protocol.errors import LedgerError


def _one_line_error(url: str, **kwargs) -> str:
    with pytest.raises(LedgerError) as info:
        Ledger(url, **kwargs)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 7
    return message


def test_unreachable_postgres_is_one_line_with_masked_password() -> None:
    message = _one_line_error("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/x")
    shown = "postgresql+psycopg://postgres:***@127.0.0.1:1/x"
    assert message.startswith(f"cannot open ledger {shown}: ")
    assert "hunter2" not in message
    assert "refused" in message.lower()


def test_sqlite_in_missing_directory_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/ledger.db"
    message = _one_line_error(url)
    assert message == f"cannot open ledger {url}: unable to open database file"
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://host/x"])
def test_garbage_urls(url: str) -> None:
    assert _one_line_error(url).startswith("cannot open ledger ")


def test_create_false_needs_existing_tables(ledger_url: str) -> None:
    assert "no ledger tables" in _one_line_error(ledger_url, create=False)


def test_read_only_missing_sqlite_file(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="^cannot open ledger sqlite:///.*: unable to open"):
        Ledger.read_only(f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "absent.db").exists()


def test_in_memory_ledger_and_context_manager() -> None:
    with Ledger("sqlite://") as ledger:
        inst = ledger.add_institution("Uni A")
        ledger.add_node(1, "n", inst.id, "pem", "fp")
        assert [n.name for n in ledger.nodes()] == ["n"]
    with pytest.raises(LedgerError, match="in-memory"):
        Ledger.read_only("sqlite://")


def _snapshot(url: str) -> dict[str, list[tuple]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: [tuple(r) for r in conn.execute(t.select().order_by(*t.primary_key))]
                    for t in TABLES}
    finally:
        engine.dispose()


def _populate(ledger: Ledger, make) -> None:
    inst = ledger.add_institution("Uni A")
    ledger.create_invite(inst, "h", expires_at=1e12)
    ledger.redeem_invite("h", now=1.0)
    node = make.node(inst.id)
    lease = make.lease(node.id)
    upd = make.answer(lease)
    ledger.add_credit(node.id, upd.id, 1.0, {"kind": "train"})
    make.lease(node.id)
    ledger.add_model_version(0, "d", "p", 0, n_updates=0, tokens=0)
    ledger.add_event("join", "hello", node_id=node.id)


def test_read_only_refuses_writes_and_changes_nothing(open_ledger, ledger_url, make) -> None:
    writer = open_ledger()
    _populate(writer, make)
    writer.close()
    before = _snapshot(ledger_url)
    path = make_url(ledger_url).database if ledger_url.startswith("sqlite") else None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None

    ro = open_ledger(read_only=True)
    assert ro.is_read_only and "read-only" in repr(ro)
    # every read works
    node = ro.nodes()[0]
    assert ro.node(node.id) == node and ro.node_by_flower_id(node.flower_node_id) == node
    assert ro.node_by_fingerprint(node.fingerprint) == node
    assert len(ro.institutions()) == len(ro.invites()) == 1
    assert len(ro.updates()) == len(ro.credits()) == 1
    assert len(ro.leases()) == 2 and len(ro.open_leases()) == 1 and ro.latest_version().version == 0
    assert len(ro.events()) == 1 and ro.node_summaries()[0].accepted == 1
    lease = ro.open_leases()[0]
    writes = [
        lambda: ro.add_institution("Uni B"),
        lambda: ro.add_institution("Uni A"),  # even a get-or-create that would only read
        lambda: ro.create_invite(1, "x", expires_at=1e12),
        lambda: ro.redeem_invite("h", now=2.0),
        lambda: ro.revoke_invite(1),
        lambda: ro.mark_invite_used(1, node.id),
        lambda: ro.release_invite(1),
        lambda: ro.add_node(9, "m", 1, "pem", "fp2"),
        lambda: ro.touch_node(node.id, now=5.0),
        lambda: ro.revoke_node(node.id),
        lambda: make.__class__(ro).lease(node.id),
        lambda: ro.close_lease(lease.id, "expired", now=5.0),
        lambda: make.__class__(ro).answer(lease),
        lambda: ro.add_credit(node.id, 1, 1.0, {}),
        lambda: ro.add_model_version(1, "d", "p", 1, n_updates=0, tokens=0),
        lambda: ro.set_val_loss(0, 1.0, 1),
        lambda: ro.add_event("x", "y"),
    ]
    for write in writes:
        with pytest.raises(LedgerError, match="read-only"):
            write()
    # The database itself refuses too, should anything get past the ledger's own check.
    with pytest.raises(Exception, match="(?i)read-?only"):
        with ro._engine.begin() as conn:
            conn.execute(text("INSERT INTO events (at, kind, message) VALUES (1, 'x', 'y')"))
    ro.close()
    assert _snapshot(ledger_url) == before
    if path:
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest


def test_reader_sees_writer_while_both_open(open_ledger, make) -> None:
    writer = open_ledger()
    inst = writer.add_institution("Uni A")
    reader = open_ledger(read_only=True)
    assert reader.nodes() == []
    node = make.node(inst.id)
    assert [n.id for n in reader.nodes()] == [node.id]
    writer.add_event("join", "x")  # the writer is not blocked by an open reader
    assert len(reader.events()) == 1


def test_sqlite_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Ledger(url) as ledger, ledger._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    with Ledger.read_only(url) as ro, ro._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_floats_round_trip_exactly(ledger: Ledger) -> None:
    t = 1_764_201_600.123456
    ledger.add_event("x", "y", at=t)
    assert ledger.events()[0].at == t and not math.isnan(t)


def test_init_on_the_named_ledger_leaves_no_sqlite_file(tmp_path, ledger_url: str) -> None:
    # init creates the tables in the database [ledger].url names, nowhere else
    d = tmp_path / "run"
    res = CliRunner().invoke(app, ["init", str(d), "--ledger", ledger_url])
    assert res.exit_code == 0, res.output
    assert not (d / "ledger.db").exists()
    with Ledger(ledger_url, create=False) as led:
        assert led.nodes() == [] and led.versions() == []

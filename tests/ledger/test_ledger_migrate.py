"""A ledger made before a lease could be handed back, or be a tasks lease: opening it for
writing widens its ``ck_leases_status`` and ``ck_leases_kind`` constraints (``coordinator.ledger.migrate``), keeping every row, index and
foreign key; a hand-back then closes a lease without counting against its node."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

from coordinator.ledger import Ledger
from coordinator.ledger.models import LEASE_KINDS, LEASE_STATUSES, TABLES
from coordinator.services.views import network_view
from protocol.errors import LedgerError
from tests.ledger.conftest import Make

OLD = "'issued', 'answered', 'expired', 'failed'"  # the statuses before handed_back
OLD_KINDS = "'train', 'eval'"  # the lease kinds before tasks leases


def make_old_ledger(url: str) -> None:
    """The tables exactly as the models say, but leases' status check as first released."""
    engine = create_engine(url)
    new = ", ".join(f"'{s}'" for s in LEASE_STATUSES)
    kinds = ", ".join(f"'{k}'" for k in LEASE_KINDS)
    try:
        with engine.begin() as conn:
            for table in TABLES:
                ddl = str(CreateTable(table).compile(engine))
                if table.name == "leases":
                    assert new in ddl and kinds in ddl
                    ddl = ddl.replace(new, OLD).replace(kinds, OLD_KINDS)
                conn.exec_driver_sql(ddl)
            for table in TABLES:
                for index in table.indexes:
                    conn.exec_driver_sql(str(CreateIndex(index).compile(engine)))
    finally:
        engine.dispose()


def status_check(engine: Engine) -> str:
    [check] = [c for c in inspect(engine).get_check_constraints("leases")
               if c["name"] == "ck_leases_status"]
    return check["sqltext"]


def test_an_old_ledger_is_widened_and_keeps_its_rows(ledger_url: str) -> None:
    make_old_ledger(ledger_url)
    with Ledger(ledger_url, create=False) as old:  # as an older coordinator wrote it
        make = Make(old)
        inst = old.add_institution("Uni A", now=1.0)
        node = make.node(inst.id)
        answered, failed, open_ = (make.lease(node.id) for _ in range(3))
        upd = make.answer(answered)
        old.close_lease(failed.id, "failed", 160.0)
        with pytest.raises(LedgerError, match="refused"):
            old.close_lease(open_.id, "handed_back", 170.0)  # the old constraint says no
        with pytest.raises(LedgerError, match="refused"):
            old.record_lease(run_id="r", round=1, shard_id=0, kind="tasks", node_id=node.id,
                             base_version=0, nonce="c" * 32, data_start=0, data_end=2,
                             deadline=1.0)
        before = [(x.id, x.nonce, x.status, x.closed_at) for x in old.leases()]

    with Ledger(ledger_url) as led:  # opened for writing: brought up to date
        assert "'handed_back'" in status_check(led._engine)
        assert [(x.id, x.nonce, x.status, x.closed_at) for x in led.leases()] == before
        assert led.close_lease(open_.id, "handed_back", 170.0)
        assert led.lease(open_.id).status == "handed_back"
        tasks = led.record_lease(run_id="r", round=1, shard_id=0, kind="tasks",
                                 node_id=node.id, base_version=0, nonce="c" * 32,
                                 data_start=0, data_end=2, deadline=1.0)
        assert led.lease(tasks.id).kind == "tasks"
        # the rest of the table is as the models define it
        names = {ix["name"] for ix in inspect(led._engine).get_indexes("leases")}
        assert {"ix_leases_node_status", "ix_leases_status"} <= names
        with pytest.raises(LedgerError):  # unique nonce
            led.record_lease(run_id="r", round=1, shard_id=9, kind="train", node_id=node.id,
                             base_version=0, nonce=answered.nonce, data_start=0, data_end=8,
                             deadline=1.0)
        with pytest.raises(LedgerError):  # the foreign key to nodes still holds
            led.record_lease(run_id="r", round=1, shard_id=9, kind="train", node_id=999,
                             base_version=0, nonce="f" * 32, data_start=0, data_end=8,
                             deadline=1.0)
        with pytest.raises(LedgerError):  # ... and the one from updates to leases
            led.record_update(lease_id=999, node_id=node.id, arrays_digest="ab" * 32,
                              verdict="accepted", tokens=1, steps=1, loss_before=1.0,
                              loss_after=1.0, wall_s=1.0)
        with pytest.raises(IntegrityError), led._engine.begin() as conn:
            conn.execute(text("UPDATE leases SET status = 'lost' WHERE id = :i"),
                         {"i": answered.id})
        assert [u.id for u in led.updates()] == [upd.id]
        assert led.updates()[0].lease_id == answered.id

    with Ledger(ledger_url) as again:  # a second opening finds nothing to do
        assert [x.status for x in again.leases()] == ["answered", "failed", "handed_back",
                                                      "issued"]


def test_a_handed_back_lease_counts_neither_for_nor_against_its_node(ledger: Ledger,
                                                                     make: Make, inst) -> None:
    node = make.node(inst.id)
    make.answer(make.lease(node.id))
    back = make.lease(node.id)
    assert ledger.close_lease(back.id, "handed_back", 170.0)
    assert not ledger.close_lease(back.id, "expired", 180.0)  # closed once
    [summary] = ledger.node_summaries(node.id)
    assert (summary.accepted, summary.rejected) == (1, 0)
    assert ledger.open_leases() == []
    ledger.touch_node(node.id, 170.0)
    [row] = network_view(ledger, now=171.0).nodes  # what the TUI and status show
    assert (row.status, row.accepted, row.rejected, row.acceptance_rate) == ("idle", 1, 0, 1.0)
    with pytest.raises(LedgerError, match="closes as one of"):
        ledger.close_lease(make.lease(node.id).id, "paused", 1.0)


def test_an_index_added_later_is_made_on_an_old_ledger(ledger_url: str) -> None:
    from sqlalchemy import create_engine, inspect, text

    Ledger(ledger_url).close()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:  # a ledger made before the index existed
        conn.execute(text("DROP INDEX ix_updates_arrays_digest"))
    assert "ix_updates_arrays_digest" not in {i["name"] for i in inspect(engine).get_indexes("updates")}
    Ledger(ledger_url).close()
    Ledger(ledger_url).close()  # and a second opener finds it made
    assert "ix_updates_arrays_digest" in {i["name"] for i in inspect(engine).get_indexes("updates")}
    engine.dispose()

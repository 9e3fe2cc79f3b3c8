"""Bringing an older ledger's CHECK constraints up to date (``models.WIDENED_CHECKS``).

A status added to a column (a lease ``handed_back``) must be allowed by the database too, or
the first write of it fails on every ledger made before it existed. PostgreSQL replaces the
constraint in one transaction. SQLite cannot alter a constraint: the table is rebuilt the way
SQLite documents (https://sqlite.org/lang_altertable.html#otheralter): foreign keys off, a
new table with the current definition, the rows copied, the old one dropped, the new one
renamed, its indexes made, the foreign keys checked — all in one ``BEGIN IMMEDIATE``
transaction, so a crash leaves the old table and a concurrent opener waits, then finds the
work done. Readers keep reading: they see the old table until the commit.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from protocol.errors import LedgerError

from coordinator.ledger.models import TABLES, WIDENED_CHECKS

__all__ = ["widen_checks"]


def _allows(sqltext: str, values: tuple[str, ...]) -> bool:
    return all(f"'{v}'" in sqltext for v in values)


def _outdated(engine: Engine) -> list[tuple[str, str, tuple[str, ...]]]:
    """The widened checks this ledger still has in their old form."""
    out = []
    inspector = inspect(engine)
    for table, column, values in WIDENED_CHECKS:
        name = f"ck_{table}_{column}"
        for check in inspector.get_check_constraints(table):
            if check["name"] == name and not _allows(check["sqltext"], values):
                out.append((table, column, values))
    return out


def widen_checks(engine: Engine) -> None:
    """Allow the values ``WIDENED_CHECKS`` lists wherever a ledger's constraint predates
    them (a no-op on an up-to-date ledger: one inspection)."""
    for table, column, values in _outdated(engine):
        if engine.dialect.name == "sqlite":
            try:
                _rebuild_sqlite(engine, _model(table), f"ck_{table}_{column}", values)
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot update ck_{table}_{column} of table {table}: "
                                  f"{exc}") from exc
        else:
            name, allowed = f"ck_{table}_{column}", ", ".join(f"'{v}'" for v in values)
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT {name} "
                                     f"CHECK ({column} IN ({allowed}))")


def _model(name: str) -> Table:
    return next(t for t in TABLES if t.name == name)


def _rebuild_sqlite(engine: Engine, table: Table, check: str, values: tuple[str, ...]) -> None:
    # the new table's DDL: the current definition under a temporary name (the tables its
    # foreign keys name come along, so the DDL can name them; they are not created)
    meta = MetaData()
    for t in TABLES:
        if t is not table:
            t.to_metadata(meta)
    new_name = f"{table.name}__widened"
    create = str(CreateTable(table.to_metadata(meta, name=new_name)).compile(engine))
    indexes = [str(CreateIndex(ix).compile(engine)) for ix in table.indexes]
    raw = engine.raw_connection()
    db: Any = raw.driver_connection
    saved = db.isolation_level
    db.isolation_level = None  # we say when the transaction begins and ends
    try:
        db.execute("PRAGMA foreign_keys = OFF")  # only outside a transaction
        db.execute("BEGIN IMMEDIATE")
        try:
            sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                             (table.name,)).fetchone()[0]
            if _allows(sql, values):  # a concurrent opener did it while we waited
                db.execute("COMMIT")
                return
            old = [row[1] for row in db.execute(f"PRAGMA table_info({table.name})")]
            unknown = sorted(set(old) - {c.name for c in table.columns})
            if unknown:
                raise LedgerError(f"cannot update {check} of table {table.name}: it has "
                                  f"columns this ATOM does not know ({', '.join(unknown)})")
            cols = ", ".join(old)
            db.execute(create)
            db.execute(f"INSERT INTO {new_name} ({cols}) SELECT {cols} FROM {table.name}")
            db.execute(f"DROP TABLE {table.name}")
            db.execute(f"ALTER TABLE {new_name} RENAME TO {table.name}")
            for ddl in indexes:
                db.execute(ddl)
            if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise LedgerError(f"cannot update {check} of table {table.name}: the ledger "
                                  "has rows whose foreign keys point nowhere")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.execute("PRAGMA foreign_keys = ON")
        db.isolation_level = saved
        raw.close()

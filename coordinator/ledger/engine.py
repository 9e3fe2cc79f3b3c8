"""Engines for the ledger: URL handling, per-backend connection settings, error lines.

SQLite gets WAL and a busy timeout so the coordinator (writer) and the TUI (reader)
work at once, and foreign keys ON. A read-only ledger is read-only in the database
itself too: SQLite opens the file with ``mode=ro``; PostgreSQL sessions run with
``default_transaction_read_only``.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from protocol.errors import LedgerError

__all__ = ["first_line", "open_engine", "shown_url"]

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 10


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error, preferring the driver's own message."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    for line in str(cause).splitlines():
        if line.strip():
            return line.strip()
    return type(cause).__name__


def shown_url(url: str | URL) -> str:
    """The URL as it may appear in messages and logs: password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable ledger URL>"


def _is_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_read_only(url: URL) -> URL:
    query = dict(url.query)
    if query.get("uri") == "true":  # already a file: URI; just demand read-only
        query["mode"] = "ro"
        return url.set(query=query)
    path = quote(os.path.abspath(url.database or ""))
    return url.set(database=f"file:{path}", query={**query, "mode": "ro", "uri": "true"})


def _on_sqlite_connect(read_only: bool, memory: bool):
    def connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not read_only and not memory:
            # Persistent in the file; lets readers read while the writer writes.
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return connect


def _on_pg_connect_read_only(dbapi_connection: Any, _record: Any) -> None:
    # SET outside a transaction so it holds for the whole session.
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    cursor.execute("SET default_transaction_read_only = on")
    cursor.close()
    dbapi_connection.autocommit = False


def open_engine(url: str | URL, *, read_only: bool) -> Engine:
    """Build an engine for ``url`` and prove it connects.

    Raises
    ------
    LedgerError
        One line naming the (masked) URL and the first line of the cause.
    """
    shown = shown_url(url)
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if backend == "sqlite":
            memory = _is_memory(parsed)
            if read_only and memory:
                raise LedgerError(f"cannot open ledger {shown}: an in-memory ledger has nothing to read")
            if read_only:
                parsed = _sqlite_read_only(parsed)
            kwargs["connect_args"] = {"check_same_thread": False}
            if memory:  # one shared connection, or every checkout sees an empty database
                kwargs["poolclass"] = StaticPool
        elif backend == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        engine = create_engine(parsed, pool_pre_ping=backend != "sqlite", **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise LedgerError(f"cannot open ledger {shown}: {first_line(exc)}") from exc
    if backend == "sqlite":
        event.listen(engine, "connect", _on_sqlite_connect(read_only, memory))
    elif backend == "postgresql" and read_only:
        event.listen(engine, "connect", _on_pg_connect_read_only)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except SQLAlchemyError as exc:
        engine.dispose()
        raise LedgerError(f"cannot open ledger {shown}: {first_line(exc)}") from exc
    return engine

"""A private PostgreSQL schema for one test (or benchmark run): created, handed out as a URL,
dropped after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = ["PG_URL", "bench_ledger_url", "fresh_schema"]

# the database a benchmark's PostgreSQL ledger lives in (a fresh schema of it)
PG_URL = os.environ.get("ATOM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def fresh_schema(base: str, prefix: str = "t") -> Iterator[str]:
    """A URL on ``base``'s database whose ``search_path`` is a new, empty schema, so parallel
    or leftover runs never clash; the schema is dropped on exit."""
    schema = f"{prefix}_{uuid.uuid4().hex}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def bench_ledger_url(kind: str, folder: Path, prefix: str) -> Iterator[str]:
    """A benchmark's empty ledger: SQLite in ``folder``, or a fresh schema of ``PG_URL``."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'ledger.db'}"
        return
    with fresh_schema(PG_URL, prefix=prefix) as url:
        yield url

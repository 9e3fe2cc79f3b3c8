"""A private PostgreSQL schema for one test: created, handed out as a URL, dropped after."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = ["fresh_schema"]


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

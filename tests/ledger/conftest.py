"""One ledger suite, two backends: every test taking ``ledger`` runs on SQLite and PostgreSQL.

PostgreSQL comes from ``ATOM_TEST_PG_URL``; each test gets a fresh schema (selected with
``search_path`` in the URL) that is dropped afterwards, so parallel or leftover runs never
clash. Without the variable the PostgreSQL half is skipped locally but fails in CI.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import make_url

from coordinator.ledger import Institution, LeaseRow, Ledger, Node, UpdateRow
from tests.pg_schema import fresh_schema

PG_ENV = "ATOM_TEST_PG_URL"
PG_SKIP = "set ATOM_TEST_PG_URL to run the ledger suite on PostgreSQL"


def backend_of(url: str) -> str:
    return make_url(url).get_backend_name()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """URL of an empty, private ledger database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PG_ENV} is not set: CI must run the ledger suite on PostgreSQL too")
        pytest.skip(PG_SKIP)
    with fresh_schema(base) as url:
        yield url

@pytest.fixture
def open_ledger(ledger_url: str) -> Iterator[Callable[..., Ledger]]:
    """Factory for ledgers on this test's database; all of them are closed at teardown."""
    opened: list[Ledger] = []

    def factory(*, read_only: bool = False, create: bool = True) -> Ledger:
        led = Ledger.read_only(ledger_url) if read_only else Ledger(ledger_url, create=create)
        opened.append(led)
        return led

    yield factory
    for led in opened:
        led.close()


@pytest.fixture
def ledger(open_ledger: Callable[..., Ledger]) -> Ledger:
    return open_ledger()


@pytest.fixture
def inst(ledger: Ledger) -> Institution:
    return ledger.add_institution("Uni A", now=1.0)


class Make:
    """Builds rows with sensible defaults so tests spell out only what they check."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._n = 0

    def _next(self) -> int:
        self._n += 1
        return self._n

    def node(self, institution_id: int, name: str | None = None, flower_id: int | None = None,
             fingerprint: str | None = None) -> Node:
        n = self._next()
        return self.ledger.add_node(
            flower_id if flower_id is not None else 1000 + n, name or f"node-{n}", institution_id,
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            fingerprint or f"{n:016x}", now=10.0,
        )

    def lease(self, node_id: int, *, kind: str = "train", nonce: str | None = None,
              issued_at: float = 100.0, deadline: float = 200.0) -> LeaseRow:
        n = self._next()
        return self.ledger.record_lease(
            run_id="run-1", round=1, shard_id=n, kind=kind, node_id=node_id, base_version=0,
            nonce=nonce or f"{n:032x}", data_start=n * 1024, data_end=(n + 1) * 1024,
            deadline=deadline, issued_at=issued_at,
        )

    def answer(self, lease: LeaseRow, *, verdict: str = "accepted", tokens: int = 1024,
               reason: str | None = None, at: float = 150.0, **metrics: float) -> UpdateRow:
        values: dict = {"steps": 4, "loss_before": 5.0, "loss_after": 4.5, "wall_s": 1.5}
        values.update(metrics)
        return self.ledger.record_update(
            lease_id=lease.id, node_id=lease.node_id, arrays_digest="ab" * 32, verdict=verdict,
            tokens=tokens, reason=reason, detail="", received_at=at, **values,
        )


@pytest.fixture
def make(ledger: Ledger) -> Make:
    return Make(ledger)

"""Reading the ledger: connection lifecycle, sessions and every query.

:class:`LedgerReads` is the read-only query layer (what the TUI needs);
:class:`~coordinator.ledger.Ledger` adds the writes on top of it. Rows come back
detached (``expire_on_commit=False``, no relationships), so nothing lazy-loads
after the session has closed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import func, inspect
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, SQLModel, col, select

from protocol.errors import LedgerError, Reason
from protocol.kinds import Kind, Verdict

from coordinator.ledger.change_mark import ChangeMark, change_mark_query
from coordinator.ledger.engine import first_line, open_engine, shown_url
from coordinator.ledger.migrate import widen_checks
from coordinator.ledger.models import (
    ADDED_COLUMNS, TABLES, CreditEntry, CreditReceipt, Event, Institution, Invite, LeaseRow,
    ModelVersion, Node, TaskScoreRow, UpdateRow, VersionEval,
)
from coordinator.ledger.summaries import NodeSummary, node_summaries_query

__all__ = ["LedgerReads", "flower_id"]

_Row = TypeVar("_Row", bound=SQLModel)
_IN_CHUNK = 500  # values per IN (...): well under SQLite's bound-parameter limit
UINT64_MAX = 2**64 - 1


def _in_chunks(values: Iterable[Any]) -> Iterator[list[Any]]:
    """``values`` sorted, without repeats, in slices small enough for one ``IN (...)``."""
    wanted = sorted(set(values))
    for i in range(0, len(wanted), _IN_CHUNK):
        yield wanted[i:i + _IN_CHUNK]


def flower_id(flower_node_id: int | str) -> str:
    """A Flower node id (uint64) as the canonical decimal string the ledger stores."""
    try:
        value = int(str(flower_node_id), 10)
    except ValueError:
        raise LedgerError(f"flower node id {flower_node_id!r} is not a decimal integer") from None
    if not 0 <= value <= UINT64_MAX:
        raise LedgerError(f"flower node id {value} is outside uint64")
    return str(value)


# built once: the loop reads it every poll (building the statement was a third of the read)
_REVOKED_IDS = select(Node.id).where(col(Node.revoked))


class LedgerReads:
    """Queries over the ATOM ledger on SQLite (default) or PostgreSQL, chosen by URL.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``sqlite:///atom.db`` or ``postgresql+psycopg://u@host/db``.
    create
        Create missing tables; with ``False`` the tables must already exist.
    """

    def __init__(self, url: str | URL, *, create: bool = True, _read_only: bool = False) -> None:
        self.url = shown_url(url)
        self.is_read_only = _read_only
        self._tx = threading.local()  # this thread's open ``Ledger.atomic`` session, if any
        self._engine = open_engine(url, read_only=_read_only)
        # the same pool, each statement its own transaction: no BEGIN and ROLLBACK round
        # trips around a single statement on PostgreSQL (``_bare``)
        self._autocommit = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        try:
            if create and not _read_only:
                SQLModel.metadata.create_all(self._engine, tables=TABLES)
                self._add_missing_columns()
                self._add_missing_indexes()
                widen_checks(self._engine)
            elif not inspect(self._engine).has_table(Node.__tablename__):
                raise LedgerError(f"cannot open ledger {self.url}: it has no ledger tables")
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise LedgerError(f"cannot open ledger {self.url}: {first_line(exc)}") from exc
        except LedgerError:
            self._engine.dispose()
            raise

    def _add_missing_indexes(self) -> None:
        """Indexes added after a table was first released (``create_all`` makes only the
        missing tables): each is created where it is missing."""
        for table in TABLES:
            for index in table.indexes:
                try:
                    index.create(self._engine, checkfirst=True)
                except SQLAlchemyError:
                    names = {i["name"] for i in inspect(self._engine).get_indexes(table.name)}
                    if index.name not in names:  # not a concurrent opener that was faster
                        raise

    def _add_missing_columns(self) -> None:
        """Bring a ledger made by an older ATOM up to date (see ``models.ADDED_COLUMNS``)."""
        def has(table: str, column: str) -> bool:
            return column in {c["name"] for c in inspect(self._engine).get_columns(table)}

        for table, column, sql_type in ADDED_COLUMNS:
            if has(table, column):
                continue
            try:
                with self._engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
            except SQLAlchemyError:
                if not has(table, column):  # not a concurrent opener that was faster
                    raise

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}{', read-only' if self.is_read_only else ''})"

    @contextmanager
    def _session(self) -> Iterator[Session]:
        active = getattr(self._tx, "session", None)
        if active is not None:  # inside Ledger.atomic: read what it has written so far
            yield active
            return
        try:
            with Session(self._engine, expire_on_commit=False) as session:
                yield session
        except IntegrityError as exc:
            raise LedgerError(f"ledger refused the write: {first_line(exc)}") from exc
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger {self.url} failed: {first_line(exc)}") from exc

    def _get(self, model: type[_Row], key: Any) -> _Row | None:
        with self._session() as session:
            return session.get(model, key)

    def _all(self, stmt: Any) -> list[Any]:
        with self._session() as session:
            return list(session.exec(stmt).all())

    @contextmanager
    def _bare(self) -> Iterator[Connection]:
        """A connection without an ORM session or a transaction around its statements, for
        the single statements the run loop makes every pass (each is atomic by itself): on
        PostgreSQL two round trips instead of four (the pool's ping, the statement; no
        BEGIN, no COMMIT or ROLLBACK), on SQLite no session setup (bench/scale.py)."""
        try:
            with self._autocommit.connect() as conn:
                yield conn
        except IntegrityError as exc:
            raise LedgerError(f"ledger refused the write: {first_line(exc)}") from exc
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger {self.url} failed: {first_line(exc)}") from exc

    def _column(self, stmt: Any) -> list[Any]:
        """The first column of ``stmt``'s rows through a bare connection (``_bare``): for
        a read the run loop makes every poll (0.6 against 1.1 ms through a session on
        SQLite in a 1,000-node run; 0.41 against 0.59 ms alone on PostgreSQL)."""
        if getattr(self._tx, "session", None) is not None:  # inside atomic: its own writes
            return self._all(stmt)
        with self._bare() as conn:
            return list(conn.execute(stmt).scalars())

    @staticmethod
    def _must(session: Session, model: type[_Row], key: Any) -> _Row:
        row = session.get(model, key)
        if row is None:
            name = model.__name__.removesuffix("Row")  # LeaseRow: "no lease 7"
            what = re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()
            raise LedgerError(f"no {what} {key} in the ledger")
        return row

    def node(self, node_id: int) -> Node | None:
        return self._get(Node, node_id)

    def node_by_flower_id(self, flower_node_id: int | str) -> Node | None:
        rows = self._all(select(Node).where(Node.flower_node_id == flower_id(flower_node_id)))
        return rows[0] if rows else None

    def node_by_fingerprint(self, fingerprint: str) -> Node | None:
        """The node enrolled with this key; a live one before revoked ones, newest first."""
        rows = self._all(select(Node).where(Node.fingerprint == fingerprint)
                         .order_by(col(Node.revoked), col(Node.id).desc()).limit(1))
        return rows[0] if rows else None

    def nodes(self) -> list[Node]:
        return self._all(select(Node).order_by(col(Node.id)))

    def revoked_node_ids(self) -> set[int]:
        """Ids of the revoked nodes (a cheap check before leasing: few rows, one query)."""
        return set(self._column(_REVOKED_IDS))

    def institutions(self) -> list[Institution]:
        return self._all(select(Institution).order_by(col(Institution.id)))

    def invites(self, institution_id: int | None = None) -> list[Invite]:
        stmt = select(Invite).order_by(col(Invite.id))
        if institution_id is not None:
            stmt = stmt.where(Invite.institution_id == institution_id)
        return self._all(stmt)

    def lease(self, lease_id: int) -> LeaseRow | None:
        return self._get(LeaseRow, lease_id)

    def lease_by_nonce(self, nonce: str) -> LeaseRow | None:
        rows = self._all(select(LeaseRow).where(LeaseRow.nonce == nonce))
        return rows[0] if rows else None

    def leases(self, node_id: int | None = None, status: str | None = None) -> list[LeaseRow]:
        stmt = select(LeaseRow).order_by(col(LeaseRow.id))
        if node_id is not None:
            stmt = stmt.where(LeaseRow.node_id == node_id)
        if status is not None:
            stmt = stmt.where(LeaseRow.status == status)
        return self._all(stmt)

    def open_leases(self) -> list[LeaseRow]:
        return self.leases(status="issued")

    def latest_lease(self) -> LeaseRow | None:
        """The lease issued last: its run id and round are the run's current ones."""
        rows = self._all(select(LeaseRow).order_by(col(LeaseRow.id).desc()).limit(1))
        return rows[0] if rows else None

    def updates(self, node_id: int | None = None) -> list[UpdateRow]:
        stmt = select(UpdateRow).order_by(col(UpdateRow.id))
        return self._all(stmt if node_id is None else stmt.where(UpdateRow.node_id == node_id))

    def accepted_with_digests(self, digests: Collection[str]) -> dict[str, UpdateRow]:
        """The first accepted update whose arrays hash to each of ``digests`` that has one
        (the replay check, for a whole step's candidates at once: a query per candidate was
        ~0.3 ms each, 1,000 per step at 1,000 nodes; bench/scale.py)."""
        out: dict[str, UpdateRow] = {}
        for part in _in_chunks(digests):
            for row in self._all(select(UpdateRow).where(
                    col(UpdateRow.arrays_digest).in_(part),
                    col(UpdateRow.verdict) == Verdict.ACCEPTED.value)
                    .order_by(col(UpdateRow.id))):
                out.setdefault(row.arrays_digest, row)
        return out

    def lost_spot_check_within(self, last: int) -> set[int]:
        """Nodes with a lost check (``Reason.MISMATCHES``: a spot check, or an eval reply
        whose windows the coordinator's recomputation contradicted) among their ``last``
        updates that count: train updates that were accepted and every lost check (other
        rejections cost nothing to make, so they do not count towards serving probation)."""
        lost = col(UpdateRow.reason).in_(sorted(Reason.MISMATCHES))
        counted = ((col(LeaseRow.kind) == Kind.TRAIN.value)
                   & (col(UpdateRow.verdict) == Verdict.ACCEPTED.value)) | lost
        recent = (select(col(UpdateRow.node_id).label("node_id"),
                         col(UpdateRow.reason).label("reason"),
                         func.row_number().over(partition_by=col(UpdateRow.node_id),
                                                order_by=col(UpdateRow.id).desc()).label("n"))
                  .join(LeaseRow, col(LeaseRow.id) == col(UpdateRow.lease_id))
                  .where(counted).subquery())
        stmt = (select(recent.c.node_id).distinct()
                .where(recent.c.n <= last, recent.c.reason.in_(sorted(Reason.MISMATCHES))))
        return set(self._all(stmt))

    def accepted_train_shards(self) -> list[tuple[int, int]]:
        """``(round, shard_id)`` of every train lease with an accepted update, in lease order
        (a spot-checked shard's two results both): what a restarted run loop replays into its
        scheduler. Two columns, not every lease and update as rows: at 200k updates those
        took ~10 s and their memory at every start (a long run holds millions)."""
        stmt = (select(col(LeaseRow.round), col(LeaseRow.shard_id))
                .join(UpdateRow, col(UpdateRow.lease_id) == col(LeaseRow.id))
                .where(col(LeaseRow.kind) == Kind.TRAIN.value,
                       col(UpdateRow.verdict) == Verdict.ACCEPTED.value)
                .order_by(col(LeaseRow.id)))
        return [(int(r), int(s)) for r, s in self._all(stmt)]

    def last_train_round(self) -> int:
        """The highest round of any train lease (0 before the first)."""
        stmt = select(func.max(col(LeaseRow.round))).where(
            col(LeaseRow.kind) == Kind.TRAIN.value)
        got = self._all(stmt)
        return int(got[0]) if got and got[0] is not None else 0

    def verdicts_after(self, after: int) -> list[tuple[int, int, str, str | None, str]]:
        """``(update id, node id, verdict, reason, lease kind)`` of every update recorded
        after update id ``after``, in id order: the rows ``coordinator.run.standing`` folds
        into the nodes' trust and probation. Two key lookups (the new updates by id, their
        leases by id), so its cost is the new rows' whatever the ledger holds: a join let
        PostgreSQL hash the whole leases table (47 ms for 1,000 new rows at 200k,
        bench/standing.py)."""
        stmt = (select(col(UpdateRow.id), col(UpdateRow.node_id), col(UpdateRow.verdict),
                       col(UpdateRow.reason), col(UpdateRow.lease_id))
                .where(col(UpdateRow.id) > after).order_by(col(UpdateRow.id)))
        rows = self._all(stmt)
        kinds: dict[int, str] = {}
        for part in _in_chunks(r[4] for r in rows):
            kinds.update(self._all(select(col(LeaseRow.id), col(LeaseRow.kind))
                                   .where(col(LeaseRow.id).in_(part))))
        return [(int(i), int(n), str(v), r, str(kinds[lid])) for i, n, v, r, lid in rows]

    def updates_with_leases(self, node_id: int | None = None) -> list[tuple[UpdateRow, LeaseRow]]:
        """Each update with the lease it answers (kind, round, shard), in one query."""
        stmt = (select(UpdateRow, LeaseRow).join(LeaseRow, col(LeaseRow.id) == col(UpdateRow.lease_id))
                .order_by(col(UpdateRow.id)))
        if node_id is not None:
            stmt = stmt.where(UpdateRow.node_id == node_id)
        return [(u, lease) for u, lease in self._all(stmt)]

    def recent_train_work(self, node_ids: Collection[int], limit: int
                          ) -> dict[int, list[tuple[int, float | None]]]:
        """``(tokens, wall_s)`` of each node's last ``limit`` accepted train updates, newest
        first (an empty list for a node without any): what its measured speed is made of
        (``coordinator.run.sizing``). One query per 500 nodes: a query per node each lease
        pass was 13x the coordinator's time at 1,000 nodes (bench/scale.py)."""
        out: dict[int, list[tuple[int, float | None]]] = {n: [] for n in set(node_ids)}
        for part in _in_chunks(out):
            newest = func.row_number().over(partition_by=col(UpdateRow.node_id),
                                            order_by=col(UpdateRow.id).desc())
            ranked = (select(col(UpdateRow.node_id).label("node_id"),
                             col(UpdateRow.tokens).label("tokens"),
                             col(UpdateRow.wall_s).label("wall_s"), newest.label("rank"))
                      .join(LeaseRow, col(LeaseRow.id) == col(UpdateRow.lease_id))
                      .where(col(UpdateRow.node_id).in_(part),
                             col(UpdateRow.verdict) == Verdict.ACCEPTED.value,
                             col(LeaseRow.kind) == Kind.TRAIN.value)).subquery()
            rows = self._all(select(ranked.c.node_id, ranked.c.tokens, ranked.c.wall_s)
                             .where(ranked.c.rank <= limit)
                             .order_by(ranked.c.node_id, ranked.c.rank))
            for node_id, tokens, wall in rows:
                out[int(node_id)].append((int(tokens), None if wall is None else float(wall)))
        return out

    def accepted_work(self, kind: str = "train",
                      since: float | None = None) -> list[tuple[float, int, float | None]]:
        """``(received_at, tokens, wall_s)`` of accepted updates on ``kind`` leases received
        after ``since``, oldest first: the network's throughput without loading whole rows."""
        stmt = (select(col(UpdateRow.received_at), col(UpdateRow.tokens), col(UpdateRow.wall_s))
                .join(LeaseRow, col(LeaseRow.id) == col(UpdateRow.lease_id))
                .where(col(UpdateRow.verdict) == Verdict.ACCEPTED.value,
                       col(LeaseRow.kind) == Kind(kind).value)
                .order_by(col(UpdateRow.received_at)))
        if since is not None:
            stmt = stmt.where(col(UpdateRow.received_at) > since)
        return [(float(at), int(tokens), None if wall is None else float(wall))
                for at, tokens, wall in self._all(stmt)]

    def credits(self, node_id: int | None = None) -> list[CreditEntry]:
        stmt = select(CreditEntry).order_by(col(CreditEntry.id))
        return self._all(stmt if node_id is None else stmt.where(CreditEntry.node_id == node_id))

    def receipts(self, node_id: int | None = None) -> list[CreditReceipt]:
        """Signed credit receipts, oldest first (a node's statement is its receipts)."""
        stmt = select(CreditReceipt).order_by(col(CreditReceipt.id))
        return self._all(stmt if node_id is None else stmt.where(CreditReceipt.node_id == node_id))

    def receipt_bodies(self, after_id: int = 0, limit: int = 50_000) -> list[tuple[int, str]]:
        """``(id, body)`` of up to ``limit`` receipts with ids above ``after_id``, oldest
        first: the receipt tree pages through every receipt this way, with neither signatures
        nor row objects (a million of those would not fit comfortably). Core rows, not the
        ORM's, whose row processing about doubled the time (~4 s per million on SQLite)."""
        stmt = (select(CreditReceipt.id, CreditReceipt.body)
                .where(col(CreditReceipt.id) > after_id).order_by(col(CreditReceipt.id))
                .limit(limit))
        with self._session() as session:
            rows = session.connection().execute(stmt).all()
        return [(int(i), str(b)) for i, b in rows]

    def versions(self) -> list[ModelVersion]:
        return self._all(select(ModelVersion).order_by(col(ModelVersion.version)))

    def version_evals(self, version: int) -> list[UpdateRow]:
        """The accepted eval updates ``version``'s validation loss was computed from."""
        return self._all(select(UpdateRow)
                         .join(VersionEval, col(VersionEval.update_id) == col(UpdateRow.id))
                         .where(col(VersionEval.version) == version).order_by(col(UpdateRow.id)))

    def task_scores(self, version: int | None = None) -> list[TaskScoreRow]:
        """The lm-eval task scores of ``version`` (default: every version's), by version,
        task, metric and filter; none on a ledger made before task scores existed that was
        opened read-only (opening it for writing adds the table)."""
        if not inspect(self._engine).has_table(TaskScoreRow.__tablename__):
            return []
        stmt = select(TaskScoreRow).order_by(col(TaskScoreRow.version), col(TaskScoreRow.task),
                                             col(TaskScoreRow.metric), col(TaskScoreRow.filter))
        if version is not None:
            stmt = stmt.where(TaskScoreRow.version == version)
        return self._all(stmt)

    def latest_version(self) -> ModelVersion | None:
        rows = self._all(select(ModelVersion).order_by(col(ModelVersion.version).desc()).limit(1))
        return rows[0] if rows else None

    def verdicts_since(self, since: float) -> list[tuple[str, str | None]]:
        """``(verdict, reason)`` of every update received at ``since`` or later."""
        return [(str(v), r) for v, r in self._all(
            select(col(UpdateRow.verdict), col(UpdateRow.reason))
            .where(col(UpdateRow.received_at) >= since))]

    def last_events(self, kinds: Sequence[str], limit: int) -> list[Event]:
        """The newest ``limit`` events of ``kinds``, oldest first."""
        rows = self._all(select(Event).where(col(Event.kind).in_(list(kinds)))
                         .order_by(col(Event.id).desc()).limit(limit))
        return rows[::-1]

    def events(self, since_id: int = 0, limit: int = 1000) -> list[Event]:
        """Events with id > ``since_id``, oldest first (a TUI polls with the last id it saw)."""
        return self._all(select(Event).where(col(Event.id) > since_id)
                         .order_by(col(Event.id)).limit(limit))

    def change_mark(self) -> ChangeMark:
        """Numbers that move whenever anything the views show is written (one statement;
        see ``coordinator.ledger.change_mark``)."""
        with self._session() as session:
            return ChangeMark.from_row(session.execute(change_mark_query()).one())

    def node_summaries(self, node_id: int | None = None) -> list[NodeSummary]:
        """One row per node (or only ``node_id``'s), aggregated in SQL."""
        with self._session() as session:
            rows = session.exec(node_summaries_query(node_id)).all()
        return [NodeSummary.from_row(row) for row in rows]

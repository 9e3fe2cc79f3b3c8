"""SQLModel tables of the ATOM ledger.

Timestamps are unix seconds as floats: portable across SQLite and PostgreSQL and
free of timezone ambiguity. Only :mod:`coordinator.ledger.ledger` queries these
tables; everyone else goes through :class:`~coordinator.ledger.Ledger`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from sqlalchemy import BigInteger, CheckConstraint, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from protocol.kinds import Verdict

__all__ = [
    "ADDED_COLUMNS",
    "CreditEntry",
    "CreditReceipt",
    "Event",
    "Institution",
    "Invite",
    "LEASE_KINDS",
    "LEASE_STATUSES",
    "LeaseRow",
    "ModelVersion",
    "Node",
    "TABLES",
    "TaskScoreRow",
    "UpdateRow",
    "VERDICTS",
    "VersionEval",
    "WIDENED_CHECKS",
]

LEASE_KINDS = ("train", "eval", "tasks")
# handed_back: the node gave it back unworked, its policy said pause (no credit, no penalty)
LEASE_STATUSES = ("issued", "answered", "expired", "failed", "handed_back")
VERDICTS = tuple(v.value for v in Verdict)


def _one_of(table: str, column: str, values: tuple[str, ...]) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=f"ck_{table}_{column}")


class Institution(SQLModel, table=True):
    __tablename__ = "institutions"

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    created_at: float


class Invite(SQLModel, table=True):
    __tablename__ = "invites"

    id: Optional[int] = Field(default=None, primary_key=True)
    institution_id: int = Field(foreign_key="institutions.id", index=True)
    secret_hash: str = Field(unique=True)
    created_at: float
    expires_at: float
    used_at: Optional[float] = None
    # No FK: the invite is claimed before the node row exists (see Ledger.redeem_invite).
    used_by_node_id: Optional[int] = None
    revoked: bool = False


class Node(SQLModel, table=True):
    __tablename__ = "nodes"
    # AUTOINCREMENT so a node id is never handed out twice, even on SQLite.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Optional[int] = Field(default=None, primary_key=True)
    # Flower node ids are uint64: they overflow a signed BIGINT, so decimal text.
    flower_node_id: str = Field(unique=True)
    name: str
    institution_id: int = Field(foreign_key="institutions.id", index=True)
    public_key_pem: str = Field(sa_column=Column(Text, nullable=False))
    fingerprint: str = Field(index=True)
    enrolled_at: float
    last_seen: Optional[float] = None
    revoked: bool = False


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_versions"

    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    digest: str
    path: str
    round: int
    created_at: float
    n_updates: int
    tokens: int = Field(sa_type=BigInteger)
    val_loss: Optional[float] = None
    val_tokens: Optional[int] = Field(default=None, sa_type=BigInteger)
    # how val_loss was made (coordinator.verify.eval_judge): eval windows the coordinator recomputed
    # to check the replies, and tokens it evaluated itself where no accepted reply covered;
    # the accepted replies it sums are the version's ``version_evals`` rows
    val_windows_recomputed: Optional[int] = None
    val_local_tokens: Optional[int] = Field(default=None, sa_type=BigInteger)


class VersionEval(SQLModel, table=True):
    """One accepted eval update whose windows a version's published validation loss sums."""

    __tablename__ = "version_evals"

    id: Optional[int] = Field(default=None, primary_key=True)
    version: int = Field(foreign_key="model_versions.version", index=True)
    update_id: int = Field(foreign_key="updates.id", unique=True)


class TaskScoreRow(SQLModel, table=True):
    """One metric of one lm-evaluation-harness task, measured on a model version
    (``atom-coordinator eval-tasks``, coordinator.evals). Measuring a task again replaces its
    rows for that version: the latest measurement is the version's score.

    ``value`` and ``stderr`` are NULL where lm-eval gave none or a non-finite one;
    ``task_digest`` is the SHA-256 of the task's files (training.evals.tasks), ``harness``
    the program that measured it (``lm-eval 0.4.13``). A table of its own, so ledgers made
    before it existed simply gain it.
    """

    __tablename__ = "task_scores"
    __table_args__ = (UniqueConstraint("version", "task", "metric", "filter",
                                       name="uq_task_scores_metric"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    version: int = Field(foreign_key="model_versions.version", index=True)
    task: str
    metric: str
    filter: str
    value: Optional[float] = None
    stderr: Optional[float] = None
    n_samples: int
    task_digest: str
    harness: str
    created_at: float


class LeaseRow(SQLModel, table=True):
    __tablename__ = "leases"
    __table_args__ = (
        _one_of("leases", "kind", LEASE_KINDS),
        _one_of("leases", "status", LEASE_STATUSES),
        Index("ix_leases_node_status", "node_id", "status"),
        Index("ix_leases_status", "status"),
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: str
    round: int
    shard_id: int
    kind: str
    node_id: int = Field(foreign_key="nodes.id")
    base_version: int
    nonce: str = Field(unique=True)
    data_start: int = Field(sa_type=BigInteger)
    data_end: int = Field(sa_type=BigInteger)
    issued_at: float
    deadline: float
    status: str = "issued"
    closed_at: Optional[float] = None


class UpdateRow(SQLModel, table=True):
    """A node's answer to one lease, accepted or not.

    The metric floats are nullable because a rejected update may carry NaN/inf,
    which SQLite cannot store; the ledger writes non-finite values as NULL.
    """

    __tablename__ = "updates"
    # arrays_digest: every train candidate is looked up by it (the replay check), so at
    # 1,000 nodes an unindexed scan per candidate made an outer step quadratic
    __table_args__ = (_one_of("updates", "verdict", VERDICTS),
                      Index("ix_updates_arrays_digest", "arrays_digest"))

    id: Optional[int] = Field(default=None, primary_key=True)
    lease_id: int = Field(foreign_key="leases.id", unique=True)
    node_id: int = Field(foreign_key="nodes.id", index=True)
    arrays_digest: str
    verdict: str
    reason: Optional[str] = None
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))
    tokens: int = Field(sa_type=BigInteger)
    steps: int
    loss_before: Optional[float] = None
    loss_after: Optional[float] = None
    wall_s: Optional[float] = None
    norm: Optional[float] = None
    # held-out loss of the base minus that of base - update, in nats (coordinator.verify.round_judge);
    # NULL where it was not measured (eval work, rejected before scoring, scoring off)
    improvement: Optional[float] = None
    received_at: float


class CreditEntry(SQLModel, table=True):
    """Append-only: the ledger offers no way to change or delete an entry."""

    __tablename__ = "credit_entries"

    id: Optional[int] = Field(default=None, primary_key=True)
    node_id: int = Field(foreign_key="nodes.id", index=True)
    update_id: int = Field(foreign_key="updates.id", unique=True)
    amount: float
    components: str = Field(sa_column=Column(Text, nullable=False))  # JSON object
    created_at: float

    def components_dict(self) -> dict[str, Any]:
        """The ``components`` JSON text parsed back into a dict."""
        return json.loads(self.components)


class CreditReceipt(SQLModel, table=True):
    """The coordinator-signed receipt of one credit entry, written in the same transaction.

    ``body`` is the receipt's canonical JSON (``protocol.receipts.receipt_bytes`` without its
    prefix line), ``signature`` the DER ECDSA signature in base64. A table of its own, not
    columns of ``credit_entries``, so ledgers made before receipts existed simply gain it.
    """

    __tablename__ = "credit_receipts"

    id: Optional[int] = Field(default=None, primary_key=True)
    credit_id: int = Field(foreign_key="credit_entries.id", unique=True)
    node_id: int = Field(foreign_key="nodes.id", index=True)
    update_id: int = Field(foreign_key="updates.id", unique=True)
    body: str = Field(sa_column=Column(Text, nullable=False))
    signature: str = Field(sa_column=Column(Text, nullable=False))
    created_at: float


class Event(SQLModel, table=True):
    __tablename__ = "events"

    id: Optional[int] = Field(default=None, primary_key=True)
    at: float
    kind: str
    node_id: Optional[int] = Field(default=None, foreign_key="nodes.id")
    message: str = Field(sa_column=Column(Text, nullable=False))


# Columns added after a table was first released: (table, column, SQL type). Opening a
# ledger for writing adds the missing ones (nullable), so older ledgers keep working.
ADDED_COLUMNS = [("updates", "improvement", "FLOAT"),
                 ("model_versions", "val_windows_recomputed", "INTEGER"),
                 ("model_versions", "val_local_tokens", "BIGINT")]

# CHECK constraints whose allowed values grew after a table was first released: (table,
# column, values). A ledger whose constraint lacks one is brought up to date when it is
# opened for writing (``coordinator.ledger.migrate.widen_checks``).
WIDENED_CHECKS = [("leases", "status", LEASE_STATUSES), ("leases", "kind", LEASE_KINDS)]

# Created explicitly so other SQLModel tables sharing the global metadata are left alone.
TABLES = [
    m.__table__  # type: ignore[attr-defined]
    for m in (Institution, Invite, Node, ModelVersion, LeaseRow, UpdateRow, CreditEntry,
              CreditReceipt, Event, VersionEval, TaskScoreRow)
]

"""Writing the ledger: the one interface through which ATOM changes its database.

Every method runs in its own short transaction. Writes that must be atomic under
concurrency lean on the database: a conditional UPDATE for invite redemption,
unique constraints for one update per lease and one credit per update.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, insert, update
from sqlalchemy.engine import URL
from sqlmodel import Session, SQLModel, col, select

from protocol.errors import EnrollmentError, LedgerError, Reason
from protocol.kinds import Verdict

from coordinator.metrics import LEDGER_WRITE_SECONDS
from coordinator.ledger.models import (
    LEASE_KINDS, LEASE_STATUSES, VERDICTS, CreditEntry, CreditReceipt, Event, Institution,
    Invite, LeaseRow, ModelVersion, Node, TaskScoreRow, UpdateRow, VersionEval,
)
from coordinator.ledger.reads import LedgerReads, flower_id
from coordinator.ledger.summaries import NodeSummary

__all__ = ["Ledger", "NodeSummary"]

_Row = TypeVar("_Row", bound=SQLModel)
# threads that compute ``record_updates``' credits (each signs a P-384 receipt, ~0.2 ms, and
# OpenSSL lets go of the GIL meanwhile) while the same step's lease rows are written: an
# outer step at 1,000 nodes signs ~1,000 receipts while every node that answers waits
_SIGNERS = 2
# rows SQLAlchemy inserts with one statement on PostgreSQL (its insertmanyvalues page): more
# are several statements, which need a transaction around them to be all or nothing
_ONE_STATEMENT = 1000


def _finite(x: float | None) -> float | None:
    """Non-finite floats become NULL: SQLite cannot store NaN, and both backends must agree."""
    return None if x is None or not math.isfinite(x) else float(x)


def _now(at: float | None) -> float:
    return time.time() if at is None else at


def _check_receipt(body: str, node_id: int, update_id: int, amount: float) -> None:
    try:
        doc = json.loads(body)
        same = (doc["node_id"], doc["update_id"], doc["amount"]) == (node_id, update_id, amount)
    except (ValueError, TypeError, KeyError):
        raise LedgerError(f"receipt for update {update_id} is not a receipt document") from None
    if not same:
        raise LedgerError(f"receipt for update {update_id} does not match its credit")


def _components_json(components: dict[str, Any]) -> str:
    try:
        return json.dumps(components, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"credit components are not plain JSON: {exc}") from None


def _update_values(r: dict[str, Any]) -> dict[str, Any]:
    """``record_update``'s arguments as an update row's columns: the verdict checked,
    non-finite metrics as NULL, the time defaulted to now."""
    if r["verdict"] not in VERDICTS:
        raise LedgerError(f"verdict must be one of {VERDICTS}, not {r['verdict']!r}")
    return dict(r, detail=r.get("detail", ""), received_at=_now(r.get("received_at")),
                **{k: _finite(r.get(k)) for k in ("loss_before", "loss_after", "wall_s", "norm",
                                                  "improvement")})


# a credit owed to a row of ``Ledger.record_updates``: amount, components, receipt (body, sig)
Credit = tuple[float, dict[str, Any], tuple[str, bytes] | None]


class Ledger(LedgerReads):
    """The ATOM ledger: every query of :class:`LedgerReads` plus the writes.

    ``Ledger(url)`` opens (and by default creates) a ledger for reading and writing;
    ``Ledger.read_only(url)`` opens an existing one whose writes all raise LedgerError.
    """

    @classmethod
    def read_only(cls, url: str | URL) -> Ledger:
        """Open an existing ledger for reading only (the TUI); the database refuses writes too."""
        return cls(url, create=False, _read_only=True)

    def __enter__(self) -> Ledger:
        return self

    def _check_writable(self, what: str) -> None:
        if self.is_read_only:
            raise LedgerError(f"ledger {self.url} is read-only: cannot {what}")

    @contextmanager
    def atomic(self, what: str) -> Iterator[None]:
        """Every write this thread makes inside commits together, or none does (a crash or
        an exception before the end leaves the ledger as it was). Nested: one transaction.

        What a crash must never split goes in one: an update row and its credit and
        receipt; a round's verdicts, credits and the version made from them."""
        if getattr(self._tx, "session", None) is not None:
            yield
            return
        self._check_writable(what)
        t0 = time.perf_counter()
        with self._session() as session, session.begin():
            self._tx.session = session
            try:
                yield
            finally:
                self._tx.session = None
        LEDGER_WRITE_SECONDS.observe(time.perf_counter() - t0)

    @contextmanager
    def _write(self, what: str) -> Iterator[Session]:
        self._check_writable(what)
        active = getattr(self._tx, "session", None)
        if active is not None:  # part of an ``atomic`` block: it commits
            yield active
            active.flush()  # ids assigned and constraints checked now, as a commit would
            return
        t0 = time.perf_counter()
        with self._session() as session, session.begin():
            yield session
        LEDGER_WRITE_SECONDS.observe(time.perf_counter() - t0)

    def _add(self, row: _Row, what: str) -> _Row:
        with self._write(what) as session:
            session.add(row)
        return row

    # -- institutions and invites ---------------------------------------------------

    def add_institution(self, name: str, *, now: float | None = None) -> Institution:
        """Get or create the institution called ``name``."""
        self._check_writable("add an institution")
        name = name.strip()
        if not name:
            raise LedgerError("institution name is empty")
        stmt = select(Institution).where(Institution.name == name)
        if found := self._all(stmt):
            return found[0]
        try:
            return self._add(Institution(name=name, created_at=_now(now)), "add an institution")
        except LedgerError:
            if found := self._all(stmt):  # lost a race to a concurrent creator
                return found[0]
            raise

    def create_invite(self, institution: Institution | int, secret_hash: str, expires_at: float,
                      *, now: float | None = None) -> Invite:
        inst_id = institution if isinstance(institution, int) else institution.id
        invite = Invite(institution_id=inst_id, secret_hash=secret_hash,
                        created_at=_now(now), expires_at=expires_at)
        return self._add(invite, "create an invite")

    def redeem_invite(self, secret_hash: str, now: float) -> Invite:
        """Claim an invite exactly once, even when several enrollments race for it.

        Raises
        ------
        EnrollmentError
            The token is unknown, used, expired or revoked.
        """
        claim = (update(Invite)
                 .where(col(Invite.secret_hash) == secret_hash, col(Invite.used_at).is_(None),
                        col(Invite.revoked).is_(False), col(Invite.expires_at) > now)
                 .values(used_at=now))
        with self._write("redeem an invite") as session:
            claimed = session.exec(claim).rowcount == 1
            invite = session.exec(select(Invite).where(Invite.secret_hash == secret_hash)).first()
        if invite is None:
            raise EnrollmentError("invite token is not valid")
        if claimed:
            return invite
        if invite.revoked:
            raise EnrollmentError("invite token was revoked")
        if invite.used_at is not None:
            raise EnrollmentError("invite token was already used")
        raise EnrollmentError("invite token has expired")

    def release_invite(self, invite_id: int) -> Invite:
        """Undo a redemption whose enrollment failed before a node was added."""
        with self._write("release an invite") as session:
            invite = self._must(session, Invite, invite_id)
            if invite.used_by_node_id is not None:
                raise LedgerError(
                    f"invite {invite_id} already enrolled node {invite.used_by_node_id}")
            invite.used_at = None
        return invite

    def mark_invite_used(self, invite_id: int, node_id: int) -> Invite:
        """Record which node a redeemed invite enrolled."""
        with self._write("mark an invite used") as session:
            invite = self._must(session, Invite, invite_id)
            self._must(session, Node, node_id)
            if invite.used_at is None:
                raise LedgerError(f"invite {invite_id} was never redeemed")
            if invite.used_by_node_id not in (None, node_id):
                raise LedgerError(
                    f"invite {invite_id} already enrolled node {invite.used_by_node_id}")
            invite.used_by_node_id = node_id
        return invite

    def revoke_invite(self, invite_id: int) -> Invite:
        with self._write("revoke an invite") as session:
            invite = self._must(session, Invite, invite_id)
            invite.revoked = True
        return invite

    # -- nodes ----------------------------------------------------------------------

    def add_node(self, flower_node_id: int | str, name: str, institution_id: int,
                 public_key_pem: str | bytes, fingerprint: str, *,
                 now: float | None = None) -> Node:
        pem = public_key_pem
        if isinstance(pem, bytes):
            pem = pem.decode("ascii")
        node = Node(flower_node_id=flower_id(flower_node_id), name=name,
                    institution_id=institution_id, public_key_pem=pem,
                    fingerprint=fingerprint, enrolled_at=_now(now))
        return self._add(node, "add a node")

    def touch_node(self, node_id: int, now: float) -> None:
        """Note that the node was seen at ``now``."""
        with self._write("touch a node") as session:
            stmt = update(Node).where(col(Node.id) == node_id).values(last_seen=now)
            if session.exec(stmt).rowcount != 1:
                raise LedgerError(f"no node {node_id} in the ledger")

    def touch_nodes(self, node_ids: Collection[int], now: float) -> None:
        """Note that these nodes were seen at ``now``: one statement for all of them (the
        loop touches every node online each second)."""
        if not node_ids:
            return
        with self._write("touch nodes") as session:
            session.exec(update(Node).where(col(Node.id).in_(sorted(node_ids)))
                         .values(last_seen=now))

    def revoke_node(self, node_id: int) -> Node:
        with self._write("revoke a node") as session:
            node = self._must(session, Node, node_id)
            node.revoked = True
        return node

    # -- leases and updates ---------------------------------------------------------

    def record_lease(self, *, run_id: str, round: int, shard_id: int, kind: str, node_id: int,
                     base_version: int, nonce: str, data_start: int, data_end: int,
                     deadline: float, issued_at: float | None = None) -> LeaseRow:
        if kind not in LEASE_KINDS:
            raise LedgerError(f"lease kind must be one of {LEASE_KINDS}, not {kind!r}")
        lease = LeaseRow(run_id=run_id, round=round, shard_id=shard_id, kind=kind, node_id=node_id,
                      base_version=base_version, nonce=nonce, data_start=data_start,
                      data_end=data_end, issued_at=_now(issued_at), deadline=deadline)
        return self._add(lease, "record a lease")

    def record_leases(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """``record_lease`` for many leases in one statement; returns their ids in order.
        A pass of the run loop leases to every node that answered since the last: one
        commit each made the tenth node wait for nine (bench/scale.py)."""
        if not rows:
            return []
        bad = {r["kind"] for r in rows} - set(LEASE_KINDS)
        if bad:
            raise LedgerError(f"lease kind must be one of {LEASE_KINDS}, not {min(bad)!r}")
        leases = LeaseRow.__table__  # type: ignore[attr-defined]
        values = [dict(r, issued_at=_now(r.get("issued_at")), status="issued") for r in rows]
        stmt = insert(leases).returning(leases.c.id, sort_by_parameter_order=True)
        if getattr(self._tx, "session", None) is not None or len(values) > _ONE_STATEMENT \
                or self._engine.dialect.name != "postgresql":
            with self._write("record leases") as session:
                return list(session.execute(stmt, values).scalars())
        # one statement, atomic by itself: no transaction around it (two round trips on
        # PostgreSQL instead of four, once per lease pass; bench/scale.py). SQLite inserts
        # row by row where the ids must come back in order: there the transaction stays.
        self._check_writable("record leases")
        t0 = time.perf_counter()
        with self._bare() as conn:
            ids = list(conn.execute(stmt, values).scalars())
        LEDGER_WRITE_SECONDS.observe(time.perf_counter() - t0)
        return ids

    def close_lease(self, lease_id: int, status: str, now: float) -> bool:
        """Close an issued lease; ``False`` when it was already closed (e.g. answered)."""
        if status not in LEASE_STATUSES[1:]:
            raise LedgerError(f"a lease closes as one of {LEASE_STATUSES[1:]}, not {status!r}")
        with self._write("close a lease") as session:
            stmt = (update(LeaseRow).where(col(LeaseRow.id) == lease_id, col(LeaseRow.status) == "issued")
                    .values(status=status, closed_at=now))
            if session.exec(stmt).rowcount == 1:
                return True
            self._must(session, LeaseRow, lease_id)
            return False

    def record_update(self, *, lease_id: int, node_id: int, arrays_digest: str, verdict: str,
                      tokens: int, steps: int, loss_before: float | None,
                      loss_after: float | None, wall_s: float | None, reason: str | None = None,
                      detail: str = "", norm: float | None = None,
                      improvement: float | None = None,
                      received_at: float | None = None) -> UpdateRow:
        """Record a node's answer and close its lease as 'answered' in one transaction.

        A lease that was already closed (e.g. expired before a late answer) keeps its status.
        """
        row = UpdateRow(**_update_values(dict(
            lease_id=lease_id, node_id=node_id, arrays_digest=arrays_digest, verdict=verdict,
            reason=reason, detail=detail, tokens=tokens, steps=steps, loss_before=loss_before,
            loss_after=loss_after, wall_s=wall_s, norm=norm, improvement=improvement,
            received_at=received_at)))
        at = row.received_at
        with self._write("record an update") as session:
            self._must(session, LeaseRow, lease_id)
            session.add(row)
            session.exec(update(LeaseRow)
                         .where(col(LeaseRow.id) == lease_id, col(LeaseRow.status) == "issued")
                         .values(status="answered", closed_at=at))
        return row

    def record_updates(self, rows: Sequence[dict[str, Any]],
                       credit: Callable[[int, int], Credit | None],
                       events: Sequence[dict[str, Any]] = ()) -> list[int]:
        """``record_update`` for many answers at once, with their credits and events: a few
        statements for all of them instead of a handful each (an outer step at 1,000 nodes
        records 1,000 verdicts while nodes wait for their next lease; bench/scale.py).

        ``rows`` are ``record_update``'s keyword arguments; ``credit(i, update_id)`` gives
        the i-th row's ``(amount, components, receipt)`` once its id is known, or None
        (only an accepted row may earn: positive amounts only, one entry per update, as
        ``add_credit``); ``events`` are ``add_event``'s. Returns the update ids in order."""
        if not rows:
            return []
        values = [_update_values(r) for r in rows]
        leases, updates = LeaseRow.__table__, UpdateRow.__table__  # type: ignore[attr-defined]
        with self._write("record updates") as session:
            wanted = {v["lease_id"] for v in values}
            found = set(session.execute(select(leases.c.id).where(leases.c.id.in_(wanted)))
                        .scalars())
            if wanted - found:
                raise LedgerError(f"no lease {min(wanted - found)} in the ledger")
            ids = list(session.execute(
                insert(updates).returning(updates.c.id, sort_by_parameter_order=True),
                values).scalars())
            numbered = list(enumerate(ids))
            parts = [numbered[k::_SIGNERS * 4] for k in range(_SIGNERS * 4)]
            with ThreadPoolExecutor(_SIGNERS, thread_name_prefix="credits") as pool:
                owing = pool.map(lambda part: [(i, uid, credit(i, uid)) for i, uid in part],
                                 parts)
                session.execute(
                    leases.update().where(leases.c.id == bindparam("lid"),
                                          leases.c.status == "issued")
                    .values(status="answered", closed_at=bindparam("at")),
                    [{"lid": v["lease_id"], "at": v["received_at"]} for v in values])
                owed = sorted((i, uid, c) for part in owing for i, uid, c in part if c)
            self._insert_credits(session, [
                (values[i]["node_id"], uid, values[i]["verdict"], amount, components, receipt,
                 values[i]["received_at"]) for i, uid, (amount, components, receipt) in owed])
            if events:
                session.execute(insert(Event.__table__),  # type: ignore[attr-defined]
                                [dict(e, at=_now(e.get("at"))) for e in events])
        return ids

    def _insert_credits(self, session: Session, entries: Sequence[tuple[
            int, int, str, float, dict[str, Any], tuple[str, bytes] | None, float]]) -> None:
        """Credit entries (with their receipts) of updates just recorded in ``session``,
        dated as the answers they pay for (as ``pay_credit`` dates them)."""
        if not entries:
            return
        rows = []
        for node_id, update_id, verdict, amount, components, receipt, at in entries:
            if verdict != Verdict.ACCEPTED or not math.isfinite(amount) or amount < 0:
                raise LedgerError(f"update {update_id} earns no credit of {amount!r}")
            if receipt is not None:
                _check_receipt(receipt[0], node_id, update_id, amount)
            rows.append({"node_id": node_id, "update_id": update_id, "amount": float(amount),
                         "components": _components_json(components), "created_at": at})
        credits = CreditEntry.__table__  # type: ignore[attr-defined]
        cids = list(session.execute(
            insert(credits).returning(credits.c.id, sort_by_parameter_order=True), rows).scalars())
        receipts = [{"credit_id": cid, "node_id": e[0], "update_id": e[1], "body": e[5][0],
                     "signature": base64.b64encode(e[5][1]).decode("ascii"), "created_at": e[6]}
                    for cid, e in zip(cids, entries) if e[5] is not None]
        if receipts:
            session.execute(insert(CreditReceipt.__table__), receipts)  # type: ignore[attr-defined]

    # -- credit, versions, events ---------------------------------------------------

    def add_credit(self, node_id: int, update_id: int, amount: float,
                   components: dict[str, Any], *, now: float | None = None,
                   receipt: tuple[str, bytes] | None = None) -> CreditEntry:
        """Append a credit for one accepted update (at most one entry per update).

        ``receipt`` is ``(canonical JSON body, signature)`` of the coordinator-signed receipt,
        stored in the same transaction; its node, update and amount must be this credit's.
        """
        if not math.isfinite(amount) or amount < 0:
            raise LedgerError(f"credit amount must be finite and >= 0, not {amount!r}")
        return self._append_credit(node_id, update_id, amount, components, now, receipt,
                                   penalty=False)

    def add_penalty(self, node_id: int, update_id: int, amount: float,
                    components: dict[str, Any], *, now: float | None = None,
                    receipt: tuple[str, bytes] | None = None) -> CreditEntry:
        """Append the negative credit a node pays for an update that lost a check (rejected
        as one of ``Reason.MISMATCHES``: the coordinator's own recomputation disagreed with
        it); at most one entry per update, as for credits."""
        if not math.isfinite(amount) or amount >= 0:
            raise LedgerError(f"a penalty must be finite and < 0, not {amount!r}")
        return self._append_credit(node_id, update_id, amount, components, now, receipt,
                                   penalty=True)

    def _append_credit(self, node_id: int, update_id: int, amount: float,
                       components: dict[str, Any], now: float | None,
                       receipt: tuple[str, bytes] | None, *, penalty: bool) -> CreditEntry:
        if receipt is not None:
            _check_receipt(receipt[0], node_id, update_id, amount)
        text = _components_json(components)
        entry = CreditEntry(node_id=node_id, update_id=update_id, amount=float(amount),
                            components=text, created_at=_now(now))
        with self._write("add a penalty" if penalty else "add credit") as session:
            upd = self._must(session, UpdateRow, update_id)
            if penalty and (upd.verdict != Verdict.REJECTED or upd.reason not in Reason.MISMATCHES):
                raise LedgerError(f"update {update_id} did not lose a spot or eval check: "
                                  "it owes no penalty")
            if not penalty and upd.verdict != Verdict.ACCEPTED:
                raise LedgerError(f"update {update_id} was rejected: it earns no credit")
            if upd.node_id != node_id:
                raise LedgerError(
                    f"update {update_id} belongs to node {upd.node_id}, not {node_id}")
            earlier = select(CreditEntry.id).where(CreditEntry.update_id == update_id)
            if session.exec(earlier).first() is not None:
                raise LedgerError(f"update {update_id} was already credited")
            session.add(entry)
            if receipt is not None:
                session.flush()  # assigns entry.id
                session.add(CreditReceipt(
                    credit_id=entry.id, node_id=node_id, update_id=update_id, body=receipt[0],
                    signature=base64.b64encode(receipt[1]).decode("ascii"),
                    created_at=entry.created_at))
        return entry

    def add_model_version(self, version: int, digest: str, path: str, round: int, *,
                          n_updates: int, tokens: int, val_loss: float | None = None,
                          val_tokens: int | None = None,
                          created_at: float | None = None) -> ModelVersion:
        row = ModelVersion(version=version, digest=digest, path=path, round=round,
                           created_at=_now(created_at), n_updates=n_updates,
                           tokens=tokens, val_loss=_finite(val_loss), val_tokens=val_tokens)
        return self._add(row, "add a model version")

    def set_val_loss(self, version: int, loss: float | None, tokens: int, *,
                     update_ids: Sequence[int] = (), windows_recomputed: int | None = None,
                     local_tokens: int | None = None) -> ModelVersion:
        """Publish ``version``'s validation loss over ``tokens``, with what it is made of:
        the accepted eval updates it sums (``update_ids``), the eval windows the coordinator
        recomputed to check the replies and the tokens it evaluated itself. One transaction:
        a loss is never published without its sources."""
        with self._write("set a validation loss") as session:
            row = self._must(session, ModelVersion, version)
            for uid in update_ids:
                upd = self._must(session, UpdateRow, uid)
                if upd.verdict != Verdict.ACCEPTED:
                    raise LedgerError(f"update {uid} was rejected: a validation loss cannot "
                                      "be computed from it")
                session.add(VersionEval(version=version, update_id=uid))
            row.val_loss, row.val_tokens = _finite(loss), tokens
            row.val_windows_recomputed, row.val_local_tokens = windows_recomputed, local_tokens
        return row

    def record_task_scores(self, version: int, scores: Sequence[dict[str, Any]], *,
                           harness: str, at: float | None = None) -> list[TaskScoreRow]:
        """Record lm-eval task scores of ``version``, replacing the rows its tasks had: one
        transaction, so a version never shows half of a measurement.

        ``scores`` are dicts with ``task``, ``metric``, ``filter``, ``value``, ``stderr``,
        ``n_samples`` and ``task_digest``; non-finite values are stored as NULL."""
        now = _now(at)
        rows = [TaskScoreRow(version=version, task=s["task"], metric=s["metric"],
                             filter=s["filter"], value=_finite(s["value"]),
                             stderr=_finite(s["stderr"]), n_samples=int(s["n_samples"]),
                             task_digest=s["task_digest"], harness=harness, created_at=now)
                for s in scores]
        with self._write("record task scores") as session:
            self._must(session, ModelVersion, version)
            tasks = sorted({r.task for r in rows})
            session.exec(delete(TaskScoreRow).where(col(TaskScoreRow.version) == version,
                                                    col(TaskScoreRow.task).in_(tasks)))
            session.add_all(rows)
        return rows

    def add_event(self, kind: str, message: str, node_id: int | None = None,
                  at: float | None = None) -> Event:
        return self._add(Event(at=_now(at), kind=kind, node_id=node_id, message=message),
                         "add an event")

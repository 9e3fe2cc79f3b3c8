"""What the node-detail screen is made of: the node's summary, its updates, its credits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text
from textual.widgets import Static

from protocol.view_types import CreditRow, NodeDetail, UpdateLine

from .. import format as fmt
from .node_table import STATUS_STYLE
from .row_note import NotedTable

__all__ = ["CreditsTable", "NodeSummaryPanel", "UpdatesTable", "components_text"]

_VERDICT_STYLE = {"accepted": "green", "rejected": "bold red"}


def components_text(components: Mapping[str, Any]) -> str:
    """Why a credit entry is worth what it is, e.g. ``train 40,960 tok × 1.0/1k``, or
    ``penalty 10 × train 40,960 tok × 1/1k (spot_check_mismatch)``."""
    rest = dict(components)
    kind = str(rest.pop("kind", "credit"))
    if kind == "penalty":
        factor, reason = rest.pop("factor", None), rest.pop("reason", None)
        parts = [kind] + ([f"{factor:g} ×"] if isinstance(factor, (int, float)) else [])
        body = components_text({"kind": "train", **rest})
        return " ".join(parts + [body] + ([f"({reason})"] if reason else []))
    parts = [kind]
    if isinstance(tokens := rest.pop("tokens", None), int):
        parts.append(f"{fmt.exact(tokens)} tok")
    if (per_1k := rest.pop("rate_per_1k", None)) is not None:
        parts.append(f"× {per_1k:g}/1k")
    parts += [f"{k}={v}" for k, v in sorted(rest.items())]
    return " ".join(parts)


class NodeSummaryPanel(Static):
    DEFAULT_CSS = "NodeSummaryPanel { height: auto; padding: 0 1; }"

    def show(self, detail: NodeDetail, now: float) -> None:
        r = detail.row
        by_kind = " + ".join(f"{k} {fmt.credits(v)}" for k, v in
                             sorted(detail.credits_by_kind.items(), key=lambda kv: -kv[1]))
        text = Text.assemble(
            (r.name, "bold"), f" · {r.institution} · ", (r.status, STATUS_STYLE.get(r.status, "")),
            f" {r.current_shard}" if r.current_shard else "",
            f" · seen {fmt.ago(r.last_seen, now)} ago\n" if r.last_seen else " · never seen\n",
            f"accepted {r.accepted} · rejected {r.rejected} ({fmt.rate(r.acceptance_rate)}) · "
            f"trained {fmt.exact(r.tokens)} tok · evaluated {fmt.exact(r.eval_tokens)} tok\n",
            "credits ", (fmt.credits(r.credits), "bold"), f" = {by_kind}" if by_kind else "")
        self.update(text)


class LedgerRowsTable(NotedTable):
    """Rows of an append-only ledger table: only ids not shown yet are added."""

    DEFAULT_CSS = "LedgerRowsTable { height: 1fr; }"
    COLUMNS: tuple[tuple[str, bool], ...] = ()  # (label, right-aligned)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._ids: set[int] = set()

    def on_mount(self) -> None:
        for label, right in self.COLUMNS:
            self.add_column(Text(label, justify="right" if right else "left"), key=label)

    def _add(self, row_id: int, cells: Sequence[str | Text], note: Text | None = None) -> None:
        if row_id in self._ids:
            return
        self._ids.add(row_id)
        if note is not None:
            self.notes[str(row_id)] = note
        styled = [c if isinstance(c, Text) else
                  Text(c, justify="right" if right else "left")
                  for c, (_, right) in zip(cells, self.COLUMNS)]
        self.add_row(*styled, key=str(row_id))


def _checks(detail: str) -> str:
    """What an accepted eval update's verdict says was checked: ``accepted (2 of 85 windows
    recomputed; ...)`` -> ``2 of 85 windows recomputed; ...``."""
    inner = detail.removeprefix("accepted (").removesuffix(")")
    return "" if inner == detail else inner


class UpdatesTable(LedgerRowsTable):
    COLUMNS = (("time", False), ("rnd", True), ("kind", False), ("shard", True),
               ("tokens", True), ("loss", False), ("verdict", False), ("why", False))

    def show(self, updates: Sequence[UpdateLine]) -> None:
        for u in updates:
            loss = (f"{fmt.loss(u.loss_before)}→{fmt.loss(u.loss_after)}" if u.kind == "train"
                    else fmt.loss(u.loss_before))
            why = (f"{u.reason}: {u.detail}" if u.reason
                   else f"norm {u.norm:.4g}" if u.norm is not None and u.kind == "train"
                   else _checks(u.detail))
            verdict = Text(u.verdict, style=_VERDICT_STYLE.get(u.verdict, ""))
            note = Text.assemble(f"update {u.update_id} · round {u.round} {u.kind} shard "
                                 f"{u.shard_id} · ", verdict, f" · {why}" if why else "")
            self._add(u.update_id, [fmt.clock(u.at), str(u.round), u.kind, str(u.shard_id),
                                    fmt.tokens(u.tokens), loss, verdict, why], note)


class CreditsTable(LedgerRowsTable):
    COLUMNS = (("time", False), ("update", True), ("amount", True), ("components", False))

    def show(self, entries: Sequence[CreditRow]) -> None:
        for c in entries:
            self._add(c.credit_id, [fmt.clock(c.at), str(c.update_id), fmt.credits(c.amount),
                                    components_text(c.components)])

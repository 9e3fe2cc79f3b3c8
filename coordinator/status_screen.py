"""``atom-coordinator status DIR``: the run on one screen, read from the ledger only.

What an operator asks first: which run and version, how many nodes are online and working,
how fast the network trains, what was accepted and rejected lately (and why), and the last
errors. The figures come from the same views as the TUI and the status RPC
(``coordinator.services.views``); nothing here writes.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.ledger.reads import LedgerReads
from coordinator.services.views import network_view

__all__ = ["RECENT_S", "Status", "as_dict", "render_status", "status"]

RECENT_S = 600.0  # "lately": the verdicts counted over the last ten minutes
_ERRORS = 5  # the last this-many problem events


@dataclass(frozen=True)
class Status:
    run_id: str
    version: int | None
    val_loss: float | None
    round: int
    nodes: int
    online: int
    working: int
    revoked: int
    tokens_per_s: float  # verified train tokens, over the view's window
    window_s: float
    leases_open: int
    accepted: int  # updates received in the last RECENT_S
    rejected: int
    reasons: dict[str, int]  # rejections in the last RECENT_S by reason
    errors: list[tuple[float, str, str]]  # (at, kind, message) of the last problems


def status(ledger: LedgerReads, now: float | None = None, run_id: str | None = None) -> Status:
    now = time.time() if now is None else now
    view = network_view(ledger, now, run_id)
    h, rows = view.header, view.nodes
    recent = ledger.verdicts_since(now - RECENT_S)
    rejected = [reason for verdict, reason in recent if verdict != "accepted"]
    problems = ledger.last_events(("error", "reject"), _ERRORS)
    return Status(
        run_id=h.run.run_id, version=h.run.version, val_loss=h.run.val_loss, round=h.run.round,
        nodes=h.nodes, online=h.online, working=sum(r.status == "working" for r in rows),
        revoked=sum(r.status == "revoked" for r in rows), tokens_per_s=h.tokens_per_s,
        window_s=h.window_s, leases_open=len(ledger.open_leases()),
        accepted=len(recent) - len(rejected), rejected=len(rejected),
        reasons=dict(Counter(reason or "?" for reason in rejected).most_common()),
        errors=[(e.at, e.kind, e.message) for e in problems])


def render_status(s: Status, console: Console) -> None:
    loss = f" · val loss {s.val_loss:.4f}" if s.val_loss is not None else ""
    version = "none yet" if s.version is None else str(s.version)
    console.print(f"[bold]run[/] {s.run_id or '?'} · version {version}{loss} · "
                  f"round {s.round}")
    idle = s.online - s.working
    console.print(f"[bold]nodes[/] {s.nodes}: {s.online} online ({s.working} working, "
                  f"{idle} idle), {s.nodes - s.online - s.revoked} offline"
                  + (f", {s.revoked} revoked" if s.revoked else ""))
    console.print(f"[bold]rate[/] {s.tokens_per_s:,.0f} verified train tokens/s "
                  f"(last {s.window_s:.0f} s) · {s.leases_open} leases out")
    why = ", ".join(f"{r} {n}" for r, n in s.reasons.items())
    console.print(f"[bold]last {RECENT_S / 60:.0f} min[/] {s.accepted} accepted, "
                  f"{s.rejected} rejected" + (f" ({why})" if why else ""))
    if not s.errors:
        console.print("[bold]problems[/] none")
        return
    table = Table(title="last problems", title_justify="left", show_edge=False)
    for col in ("at", "kind", "message"):
        table.add_column(col, overflow="fold")
    for at, kind, message in s.errors:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)), kind, message)
    console.print(table)


def as_dict(s: Status) -> dict[str, Any]:
    return asdict(s)


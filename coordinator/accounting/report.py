"""The run summary: one dict (the demo's ``--json``), and how it looks in a terminal."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from coordinator.ledger import Ledger

__all__ = ["run_summary", "render_summary"]

_BAR = 36


def run_summary(ledger: Ledger, ledger_url: str) -> dict[str, Any]:
    versions = ledger.versions()
    rounds = max((lease.round for lease in ledger.leases()), default=0)
    nodes = []
    for s in ledger.node_summaries():
        d = asdict(s)
        d["credits"] = round(d["credits"], 6)
        nodes.append(d)
    latest = versions[-1] if versions else None
    return {
        "rounds": rounds,
        "nodes": nodes,
        "val_loss": [v.val_loss for v in versions],
        "versions": [{"version": v.version, "round": v.round, "updates": v.n_updates,
                      "tokens": v.tokens, "val_loss": v.val_loss, "digest": v.digest}
                     for v in versions],
        "ledger": ledger_url,
        "checkpoint": latest.path if latest else None,
    }


def _bar(value: float, top: float, style: str, width: int = _BAR) -> Text:
    n = 0 if top <= 0 else max(1, round(width * value / top))
    return Text("█" * n, style=style)


def render_summary(summary: dict[str, Any], console: Console) -> None:
    wide = console.width >= 110  # the contribution bars only where they fit
    table = Table(title="Contributions", title_justify="left")
    for col, just in (("node", "right"), ("name", "left"), ("institution", "left"),
                      ("accepted", "right"), ("rejected", "right"), ("tokens", "right"),
                      ("credits", "right")) + ((("", "left"),) if wide else ()):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    top = max((n["tokens"] for n in summary["nodes"]), default=0)
    for n in summary["nodes"]:
        row = [str(n["node_id"]), n["name"], n["institution"], str(n["accepted"]),
               str(n["rejected"]) if not n["rejected"] else f"[red]{n['rejected']}[/]",
               f"{n['tokens']:,}", f"{n['credits']:.2f}"]
        table.add_row(*row, *([_bar(n["tokens"], top, "green", 24)] if wide else []))
    curve = Table(title="Validation loss by model version", title_justify="left",
                  show_header=False, box=None)
    losses = [v for v in summary["val_loss"] if v is not None]
    top_loss = max(losses, default=0.0)
    for v in summary["versions"]:
        loss = v["val_loss"]
        curve.add_row(f"v{v['version']}", _bar(loss or 0.0, top_loss, "cyan"),
                      "—" if loss is None else f"{loss:.3f}",
                      f"[dim]{v['updates']} updates · {v['tokens']:,} tokens[/]")
    console.print(Group(table, Text(""), curve))
    console.print(f"ledger: {summary['ledger']}\ncheckpoint: {summary['checkpoint']}",
                  style="dim")

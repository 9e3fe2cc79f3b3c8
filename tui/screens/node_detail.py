"""One node: its contribution over time, every update with its verdict, every credit entry.

The same screen is the whole contributor view (``atom-tui --node N``), where it is the only
screen and the app never reads any other node's data.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import TabbedContent, TabPane

from protocol.view_types import NodeDetail

from .. import format as fmt
from ..snapshot import Snapshot
from ..widgets import Chart, ChartData, CreditsTable, NodeSummaryPanel, RowNote, UpdatesTable
from .base import AtomScreen

__all__ = ["NodeDetailScreen", "history_chart"]


def history_chart(detail: NodeDetail) -> ChartData:
    pts = detail.history
    return ChartData(xs=tuple(p.at for p in pts), ys=tuple(float(p.tokens) for p in pts),
                     x_labels=(fmt.clock(pts[0].at), fmt.clock(pts[-1].at)) if pts else ("", ""),
                     y_format=fmt.tokens, empty="no accepted work yet")


class NodeDetailScreen(AtomScreen):
    DEFAULT_CSS = """
    NodeDetailScreen #history { height: 1fr; min-height: 8; }
    NodeDetailScreen TabbedContent { height: 2fr; }
    NodeDetailScreen TabPane { padding: 0; }
    """
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("u", "tab('updates')", "Updates"),
        Binding("c", "tab('credits')", "Credits"),
    ]

    def __init__(self, node_id: int, *, contributor: bool = False) -> None:
        super().__init__()
        self.node_id, self.contributor = node_id, contributor
        self.LABEL = f"Node {node_id}"

    def body(self) -> ComposeResult:
        yield NodeSummaryPanel("reading the ledger…", id="summary")
        yield Chart(id="history")
        with TabbedContent(initial="updates"):
            with TabPane("Updates", id="updates"):
                yield UpdatesTable(id="updates-table")
                yield RowNote("updates-table", id="update-note")
            with TabPane("Credits", id="credits"):
                yield CreditsTable(id="credits-table")

    def on_mount(self) -> None:
        self.atom.watch_node(self.node_id)
        super().on_mount()
        self.query_one(UpdatesTable).focus()

    def on_unmount(self) -> None:
        self.atom.unwatch_node(self.node_id)

    def show(self, snapshot: Snapshot) -> None:
        detail = snapshot.detail
        if detail is None or detail.row.node_id != self.node_id:
            return
        self.LABEL = detail.row.name
        self.query_one(NodeSummaryPanel).show(detail, snapshot.at)
        chart = self.query_one("#history", Chart)
        chart.border_title = f"tokens trained · {fmt.exact(detail.row.tokens)}"
        chart.show(history_chart(detail))
        self.query_one(UpdatesTable).show(detail.updates)
        self.query_one(CreditsTable).show(detail.credits)
        self.show_notes()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The contributor view has nothing to go back to.
        return not (action == "back" and self.contributor)

    def action_back(self) -> None:
        self.dismiss()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # Arrow keys move through the rows of the tab in view.
        table = UpdatesTable if event.pane.id == "updates" else CreditsTable
        self.query_one(table).focus()

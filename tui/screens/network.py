"""The network: who is contributing, what each node is doing, and what it has earned."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding

from ..snapshot import Snapshot
from ..widgets import NodeTable
from .base import AtomScreen

__all__ = ["NetworkScreen"]


class NetworkScreen(AtomScreen):
    LABEL = "Network"
    BINDINGS = [
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse"),
    ]

    def body(self) -> ComposeResult:
        yield NodeTable(id="nodes")

    def show(self, snapshot: Snapshot) -> None:
        if snapshot.network is not None:
            self.query_one(NodeTable).show(snapshot.network.nodes, snapshot.at)

    def action_sort(self) -> None:
        self.query_one(NodeTable).cycle_sort()

    def action_reverse(self) -> None:
        self.query_one(NodeTable).reverse_sort()

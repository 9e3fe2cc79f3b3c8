"""Widgets, one module per area of the screen."""

from __future__ import annotations

from .chart import Chart, ChartData
from .event_table import EventTable
from .node_panels import CreditsTable, NodeSummaryPanel, UpdatesTable
from .node_table import NodeTable
from .row_note import NotedTable, RowNote
from .run_header import RunHeader

__all__ = ["Chart", "ChartData", "CreditsTable", "EventTable", "NodeSummaryPanel", "NodeTable",
           "NotedTable", "RowNote", "RunHeader", "UpdatesTable"]

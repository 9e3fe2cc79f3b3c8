"""The TUI's screens, one module each."""

from __future__ import annotations

from .events import EventsScreen
from .network import NetworkScreen
from .node_detail import NodeDetailScreen
from .progress import ProgressScreen

__all__ = ["EventsScreen", "NetworkScreen", "NodeDetailScreen", "ProgressScreen"]

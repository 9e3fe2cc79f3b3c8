"""The one-line bar at the top of every screen: where we are and how the run is doing."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from protocol.view_types import NetworkHeader, RunInfo

from .. import format as fmt

__all__ = ["RunHeader", "header_text"]


def header_text(title: str, run: RunInfo | None, network: NetworkHeader | None = None) -> Text:
    """``title`` then the run's position; the network figures only when given."""
    text = Text.assemble((f" {title} ", "bold reverse"), " ")
    if run is None:
        return text.append("reading the ledger…", "italic")
    parts: list[str] = [run.run_id or "(no run yet)", f"round {run.round}"]
    if run.version is not None:
        parts += [f"v{run.version}", f"loss {fmt.loss(run.val_loss)}"]
    if network is not None:
        parts += [f"{network.online}/{network.nodes} online",
                  fmt.tokens_per_s(network.tokens_per_s)]
    text.append(" · ".join(parts))
    return text


class RunHeader(Static):
    DEFAULT_CSS = """
    RunHeader { dock: top; height: 1; background: $panel; color: $foreground; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: Text | None = None

    def show(self, title: str, run: RunInfo | None, network: NetworkHeader | None = None) -> None:
        text = header_text(title, run, network)
        if text != self._shown:  # a poll that changed nothing redraws nothing
            self._shown = text
            self.update(text)

"""Progress: validation loss over model versions and the network's throughput over time."""

from __future__ import annotations

from textual.app import ComposeResult

from protocol.view_types import ProgressView

from .. import format as fmt
from ..snapshot import Snapshot
from ..widgets import Chart, ChartData
from .base import AtomScreen

__all__ = ["ProgressScreen", "loss_chart", "throughput_chart"]


def loss_chart(view: ProgressView) -> ChartData:
    points = [p for p in view.losses if p.val_loss is not None]
    return ChartData(
        xs=tuple(float(p.version) for p in points), ys=tuple(p.val_loss or 0.0 for p in points),
        x_labels=(f"v{points[0].version}", f"v{points[-1].version}") if points else ("", ""),
        y_format=lambda y: f"{y:.3f}", empty="no model version has a validation loss yet")


def throughput_chart(view: ProgressView) -> ChartData:
    pts = view.throughput
    return ChartData(
        kind="bar", ys=tuple(p.tokens_per_s for p in pts),
        x_labels=(fmt.clock(pts[0].start), fmt.clock(pts[-1].start + view.bucket_s))
        if pts else ("", ""),
        y_format=fmt.tokens, empty="no accepted training update yet")


class ProgressScreen(AtomScreen):
    LABEL = "Progress"

    def body(self) -> ComposeResult:
        yield Chart(id="loss")
        yield Chart(id="throughput")

    def show(self, snapshot: Snapshot) -> None:
        view = snapshot.progress
        if view is None:
            return
        loss, tput = self.query_one("#loss", Chart), self.query_one("#throughput", Chart)
        last = next((p for p in reversed(view.losses) if p.val_loss is not None), None)
        loss.border_title = "validation loss per model version" + (
            f" · v{last.version} {fmt.loss(last.val_loss)}" if last else "")
        tput.border_title = f"network throughput, tokens/s per {view.bucket_s:g} s"
        loss.show(loss_chart(view))
        tput.show(throughput_chart(view))

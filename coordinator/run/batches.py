"""Leases sent for one verdict, and what the run loop knows of each lease it sent.

A round's training is judged together once every train lease is settled; a version's
evaluation once every eval lease of it is. The run loop keeps several batches open at
once (the evaluation of v while v + 1 is trained), so a reply finds its batch through
the ``Sent`` record of its message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.messages import Lease

from coordinator.ledger import Node
from coordinator.verify.round_judge import Candidate

__all__ = ["Batch", "EvalBatch", "Sent", "TaskBatch", "TrainBatch"]


@dataclass
class Batch:
    """Leases sent for one verdict: a round's training, or the evaluation of one version.

    ``version`` is the model version its leases are built on (what replies are checked
    against, even after the run has moved on to the next version).
    """

    kind: str
    version: int
    open: int = 0  # leases not yet answered, failed or expired
    cands: list[Candidate] = field(default_factory=list)  # replies that passed ``verify``
    screened_out: list[Lease] = field(default_factory=list)  # replies that did not


@dataclass
class TrainBatch(Batch):
    pairs: list[tuple[Lease, Lease]] = field(default_factory=list)  # (worker's, spot check)
    trust: dict[int, float] = field(default_factory=dict)  # by node, when it was leased


@dataclass
class EvalBatch(Batch):
    base: dict[str, np.ndarray] = field(default_factory=dict)
    span: tuple[int, int] = (0, 0)
    copies: list[tuple[Lease, Lease]] = field(default_factory=list)  # (original, quorum copy)


@dataclass
class TaskBatch(Batch):
    """The tasks lease of one version (``coordinator.run.task_evals``): one lease, one node."""

    base: dict[str, np.ndarray] = field(default_factory=dict)
    digest: str = ""  # the version's
    round: int = 0  # its leases'
    tried: list[int] = field(default_factory=list)  # the nodes leased it so far, this one last


@dataclass(frozen=True)
class Sent:
    lease: Lease
    node: Node
    row_id: int
    batch: Batch

"""Every node's trust and probation, kept up to date by reading only the verdicts recorded
since the last read.

The run loop asks for both after every outer step and round (who gets spot-checked, how much
an update weighs). Aggregating the whole ledger each time (``Ledger.node_summaries`` and
``lost_spot_check_within``) grows with the run: at 1,000 nodes and 200 updates each the two
queries took 0.4-0.8 s per step on SQLite and on PostgreSQL, this read 6 and 15 ms
(``bench/standing.py``), and a run goes on for thousands of steps. Updates are append-only
and the run loop is their only writer, so folding in the rows past the last id seen gives
the same numbers (a test compares them with the full queries after random histories, on
both backends).

The rules are ``coordinator.verify.trust``'s, as the full queries apply them: trust is
``trust_score`` of a node's accepted and rejected train updates, with every lost check
(``Reason.MISMATCHES``, eval and tasks replies too) counted as a rejection and as a mismatch;
a node is on probation while a lost check is among its last ``PROBATION_UPDATES`` updates
that count (accepted train updates and lost checks).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocol.errors import Reason
from protocol.kinds import Kind, Verdict

from coordinator.ledger import Ledger
from coordinator.verify.trust import PROBATION_UPDATES, trust_score

__all__ = ["Standing"]


@dataclass
class Standing:
    ledger: Ledger
    _last: int = 0  # the last update id folded in
    # node -> [accepted train updates, rejected train updates + lost checks, lost checks]
    _counts: dict[int, list[int]] = field(default_factory=dict)
    # node -> whether each of its last PROBATION_UPDATES counted updates lost a check
    _recent: dict[int, deque[bool]] = field(default_factory=dict)

    def refresh(self) -> None:
        """Fold in the verdicts recorded since the last refresh."""
        for uid, node, verdict, reason, kind in self.ledger.verdicts_after(self._last):
            self._last = uid
            lost = reason in Reason.MISMATCHES
            train, accepted = kind == Kind.TRAIN, verdict == Verdict.ACCEPTED
            counts = self._counts.setdefault(node, [0, 0, 0])
            counts[0] += train and accepted
            counts[1] += (train and not accepted) or lost
            counts[2] += lost
            if (train and accepted) or lost:
                self._recent.setdefault(node, deque(maxlen=PROBATION_UPDATES)).append(lost)

    def trust(self) -> dict[int, float]:
        """Trust of every node with a verdict (others: ``NEW_NODE_TRUST``, by ``.get``)."""
        return {node: trust_score(*c) for node, c in self._counts.items()}

    def probation(self) -> set[int]:
        """The nodes on probation."""
        return {node for node, lost in self._recent.items() if any(lost)}

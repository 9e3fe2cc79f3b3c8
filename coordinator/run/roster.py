"""Who may work: the nodes online, their ledger rows, revocations, benching and speeds.

The run loop asks the roster which nodes are eligible for work (online, enrolled, not
revoked, not benched), which are revoked (read once per pass), how fast each node is (from
its recent accepted work, for sizing leases) and when to leave a node out for a while (it
missed a deadline, failed a lease or handed one back). Everything here is read from the
ledger as rarely as correctness allows: at 1,000 nodes a read per node per pass was most of
the coordinator's time (bench/scale.py).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coordinator import metrics
from coordinator.ledger import Ledger, Node
from coordinator.run.sizing import HISTORY, tokens_per_s
from coordinator.run.transport import Transport
from coordinator.verify.record import finite_or_none
from coordinator.verify.round_judge import Candidate

__all__ = ["BENCH_S", "Roster", "TOUCH_S"]

log = logging.getLogger(__name__)

ROWS_S = 30.0  # the longest node rows (names, keys) are used without reading them again
# how often the nodes online get their ``last_seen`` written (a node new online at once):
# well inside the views' 60 s online window; each second cost PostgreSQL 1,000 row versions
# a second, and made the TUI's change mark move every second (bench/scale.py)
TOUCH_S = 10.0
BENCH_S = 90.0  # a node that missed a deadline sits out this long (Flower needs ~70 s to drop it)


@dataclass
class Roster:
    ledger: Ledger
    transport: Transport
    clock: Callable[[], float]
    target_lease_s: float  # [train] target_lease_s: speeds are read only when leases are sized
    nodes: dict[int, Node] = field(default_factory=dict)  # by Flower id
    rows: dict[int, Node] = field(default_factory=dict)  # by ledger id
    benched: dict[int, float] = field(default_factory=dict)  # ledger id -> until
    _seen: set[int] = field(default_factory=set)
    _by_fid: dict[int, Node] = field(default_factory=dict)  # the rows as last read
    _unknown: set[int] = field(default_factory=set)  # online, not in the ledger at that read
    _rows_read: float = -math.inf
    _touched: float = -math.inf  # when every node online last had its last_seen written
    # each node's last HISTORY accepted train updates, (tokens, wall_s) newest first, as the
    # ledger holds them: read once per node, then kept up to date as steps record work
    _work: dict[int, deque[tuple[int, float | None]]] = field(default_factory=dict)
    _revoked: tuple[int, set[int]] = (-1, set())  # (pass read in, revoked node ids)

    def eligible(self) -> list[Node]:
        """The nodes online that may get work now; records who came and went."""
        now, out, seen, new = self.clock(), [], [], []
        online = set(self.transport.online())
        rows = self._node_rows(online, now)
        # Revocations read afresh: a node revoked mid-run gets no further lease. One read
        # and one write for the whole network: at 1,000 nodes a query per node each
        # second was most of the coordinator's time (bench/scale.py).
        revoked = self.ledger.revoked_node_ids()
        for fid in sorted(online):
            node = rows.get(fid)
            if node is None or node.revoked or node.id in revoked:
                continue
            self.nodes[fid] = self.rows[node.id] = node
            if fid not in self._seen:
                self.ledger.add_event("online", f"{node.name} is online", node_id=node.id)
                new.append(node.id)
            seen.append(node.id)
            if self.benched.get(node.id, 0.0) <= now:
                out.append(node)
        if now - self._touched >= TOUCH_S:
            self.ledger.touch_nodes(seen, now)
            self._touched = now
        else:
            self.ledger.touch_nodes(new, now)
        for fid in self._seen - online:
            if (node := self.nodes.get(fid)) is not None:
                self.ledger.add_event("leave", f"{node.name} went offline", node_id=node.id)
        self._seen = online
        metrics.NODES_ONLINE.set(sum(1 for fid in online if fid in self.nodes
                                     and not self.nodes[fid].revoked))
        return out

    def still_eligible(self, nodes: list[Node], revoked: set[int]) -> list[Node]:
        """``nodes`` less those revoked or benched since they were found eligible."""
        now = self.clock()
        if not revoked and all(until <= now for until in self.benched.values()):
            return nodes  # the usual case: no scan of every node
        return [n for n in nodes if n.id not in revoked and self.benched.get(n.id, 0.0) <= now]

    def revoked(self, pass_no: int) -> set[int]:
        """The revoked nodes' ids, read once per loop pass ``pass_no`` (a poll: the
        screening of its replies and the leases they free share the read): a revocation
        counts from the next poll on. One read per reply was a fifth of the screening at
        1,000 nodes, one more per lease pass ~1 ms (bench/scale.py)."""
        if self._revoked[0] != pass_no:
            self._revoked = (pass_no, self.ledger.revoked_node_ids())
        return self._revoked[1]

    def bench(self, node: Node, why: str, seconds: float = BENCH_S) -> float:
        """Give ``node`` no work for ``seconds`` (longer if it is benched longer already);
        returns the wait."""
        self.benched[node.id] = max(self.benched.get(node.id, 0.0), self.clock() + seconds)
        log.info("benching %s for %.0f s: %s", node.name, seconds, why)
        return seconds

    def speeds(self, node_ids: Iterable[int]) -> dict[int, float | None]:
        """Tokens/s of each node from its recent accepted work, for sizing leases: none
        unless [train] target_lease_s asks for sized leases."""
        return self.measured_speeds(node_ids) if self.target_lease_s > 0 else {}

    def measured_speeds(self, node_ids: Iterable[int]) -> dict[int, float | None]:
        """Tokens/s of each node from its recent accepted work (None: no usable history)."""
        # the ledger is read once per node (it scans the node's history): reading every
        # node each lease pass, or each version, grows with the run (bench/scale.py)
        ids = list(node_ids)
        if missing := [n for n in ids if n not in self._work]:
            for n, rows in self.ledger.recent_train_work(missing, HISTORY).items():
                self._work[n] = deque(rows, maxlen=HISTORY)
        return {n: tokens_per_s(self._work[n]) for n in ids}

    def note_work(self, kept: Iterable[Candidate]) -> None:
        """Add the accepted train updates a step just recorded to their nodes' histories,
        as the ledger holds them (``record._update_row``)."""
        for c in kept:
            if (history := self._work.get(c.node.id)) is not None:
                m = c.judged.update.metrics
                history.appendleft((int(m.tokens), finite_or_none(m.wall_s)))

    def _node_rows(self, online: set[int], now: float) -> dict[int, Node]:
        """The ledger's node rows by Flower id, read again when a node not read before is
        online, else at most every ``ROWS_S``: reading 1,000 rows each second was a tenth
        of the loop's time (bench/scale.py); what changes mid-run that matters, a
        revocation, is read each time by itself."""
        new = online - self._by_fid.keys() - self._unknown
        if new or now - self._rows_read >= ROWS_S:
            self._by_fid = {int(n.flower_node_id): n for n in self.ledger.nodes()}
            self._unknown = online - self._by_fid.keys()
            self._rows_read = now
        return self._by_fid

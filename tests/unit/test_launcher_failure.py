"""What `start` and the demo report when a run did not complete."""

from __future__ import annotations

from pathlib import Path

from coordinator.rundir import init_run
from coordinator.services.launcher import Coordinator
from protocol.processes import free_port


def test_failure_is_the_last_error_even_past_one_page_of_events(tmp_path: Path) -> None:
    rd = init_run(tmp_path / "run", network_fleet_port=free_port(),
                  network_coordinator_port=free_port(), network_metrics_address="")
    coord = Coordinator(rd)
    coord.ledger = rd.ledger()
    try:
        assert coord.failure("finished:completed") is None
        assert coord.failure("finished:failed") == "run ended as finished:failed"
        coord.ledger.add_event("error", "run failed: first")
        for i in range(1000):  # more than one page of events(): the last error is past it
            coord.ledger.add_event("online", f"node {i} is online")
        coord.ledger.add_event("error", "run failed: the ledger went away")
        assert coord.failure("finished:failed") == "run failed: the ledger went away"
    finally:
        coord.ledger.close()

"""Riding out a ledger that fails under a live coordinator: the loop is rebuilt from what
the ledger committed, exactly as after a crash (``RunLoop`` resumes: leases in flight
closed, the unfinished round redone)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from protocol.errors import LedgerError

from coordinator.run.loop import RunLoop

__all__ = ["LEDGER_RETRY_DELAYS_S", "run_resuming"]

log = logging.getLogger(__name__)

# a ledger that fails (the database restarted, a commit lost) is waited for this long in
# all, then the loop resumes from what it committed (~2 min)
LEDGER_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


def run_resuming(make: Callable[[], RunLoop], *,
                 delays: Sequence[float] = LEDGER_RETRY_DELAYS_S,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """Run the loop ``make`` builds; when the ledger fails under it (``LedgerError``: the
    database went away or refused a commit), wait and build it again from what the ledger
    holds — the open transaction rolled back, so this is a resume after a crash (leases in
    flight closed, the round redone). A ledger still failing after ``delays`` ends the run;
    any other error ends it at once."""
    for delay in [*delays, None]:
        try:
            make().run()
            return
        except LedgerError as err:
            if delay is None:
                raise
            log.warning("the ledger failed (%s); resuming from it in %.0f s",
                        str(err).splitlines()[0], delay)
            sleep(delay)

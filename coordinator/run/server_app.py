"""The Flower ServerApp: wiring only. The run loop lives in ``coordinator.run.loop``."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from protocol.blobstore import BlobDir
from protocol.flower_pulls import quick_object_pulls
from protocol.processes import watch_owner
from training.corpus import load_corpus

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.run.async_loop import make_run_loop
from coordinator.run.loop import RunLoop
from coordinator.run.resume import run_resuming
from coordinator.run.model_store import ModelStore
from coordinator.run.reply_spool import ReplySpool, WorkSpool
from coordinator.run.transport import FlowerTransport, SpooledTransport
from coordinator.rundir import RunDir

__all__ = ["app"]

# Flower is asked for replies at most this often: they come by the spool, which the loop
# reads at every pass (0.05 s); Flower's way is for a reply the service refused
FLOWER_POLL_S = 0.2

app = ServerApp()


def _log_to(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a run lasts weeks: the log rotates by itself (logrotate handles the process logs)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10_000_000, backupCount=5)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("coordinator")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _orphaned() -> None:
    # The coordinator or its SuperLink died (kill -9, OOM): a serverapp left running would
    # hold the ledger and lease work no one collects. Dying now is what a crash is; the next
    # start resumes.
    logging.getLogger("coordinator").error("the coordinator or its SuperLink is gone: exiting")
    os._exit(70)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rd = RunDir(Path(str(context.run_config["workdir"])))
    _log_to(rd.logs / "serverapp.log")
    quick_object_pulls()  # a reply's objects as they land, not a 1 s backoff later
    for owner in filter(None, str(context.run_config.get("owners", "")).split(",")):
        watch_owner(owner, _orphaned, every_s=0.5)  # the coordinator, its SuperLink
    cfg = rd.config()
    with rd.ledger(cfg) as ledger:
        try:
            issuer = ReceiptIssuer.load(rd.key_path)  # once: every receipt of this run
            corpus = load_corpus(rd.corpus)
            # replies as nodes hand them in, ahead of Flower's way back, and leases for
            # nodes to take ahead of Flower's way there; one for the whole run (a loop made
            # again after an outage keeps its drain of Flower's copies)
            transport = SpooledTransport(FlowerTransport(grid), ReplySpool(rd.replies),
                                         flower_every_s=FLOWER_POLL_S,
                                         ahead=WorkSpool(rd.next_work))

            def make() -> RunLoop:  # from what the ledger holds (again after an outage)
                return make_run_loop(cfg, ledger, transport,
                               ModelStore.open(rd.checkpoints, cfg, ledger, corpus=corpus),
                               corpus,
                               issuer=issuer, blobs=BlobDir(rd.blobs))

            try:
                run_resuming(make)
            finally:
                transport.close()  # its drain thread (Flower's copies of spooled replies)
        except Exception as err:
            logging.getLogger("coordinator").exception("run failed")
            ledger.add_event("error", f"run failed: {str(err).splitlines()[0][:300]}")
            raise

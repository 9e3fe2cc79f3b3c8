"""Kill the coordinator at many points of a run and count what a restart got wrong.

The run loop over the in-process fake network (3 honest nodes, spot checks and eval quorum
on) is killed as the ledger is about to make its n-th write (``tests/unit/chaos.py`` says why
that is a ``kill -9``), then a fresh coordinator finishes the run and the ledger's invariants
are checked: no lease left open, versions consecutive and all scored, no round skipped, every
accepted update in its round's version, no shard consumed twice, one credit and one valid
receipt per accepted update, the model and its optimizer state those of the latest version.

    python bench/chaos.py                 # every write of a 2-round run
    python bench/chaos.py --rounds 3 --trials 40 --json
    python bench/chaos.py --async --rounds 3 --trials 40    # the asynchronous loop

Run on demand; the test suite runs a few of these points (``ATOM_CHAOS_TRIALS``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]  # the fake network lives with the tests

from chaos import ASYNC, run_chaos  # noqa: E402
from loop_world import build_test_corpus  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds (outer steps with --async)")
    p.add_argument("--trials", type=int, default=0, help="crash points (0: every write)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async", dest="asynchronous", action="store_true",
                   help="the asynchronous loop (two updates per outer step)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = build_test_corpus(root / "corpus")
        (root / "chaos").mkdir()
        out = run_chaos(root / "chaos", corpus, a.rounds, a.trials, a.seed,
                        ASYNC if a.asynchronous else "")
    out["asynchronous"] = a.asynchronous
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 1 if out["chaos_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())

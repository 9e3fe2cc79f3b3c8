"""Kill the coordinator at many points of a run and count what a restart got wrong.

The run loop over the in-process fake network (3 honest nodes, spot checks and eval quorum
on) is killed as the ledger is about to make its n-th write (``tests/unit/chaos.py`` says why
that is a ``kill -9``), then a fresh coordinator finishes the run and the ledger's invariants
are checked: no lease left open, versions consecutive and all scored, no round skipped, every
accepted update in its round's version, no shard consumed twice, one credit and one valid
receipt per accepted update, the model and its optimizer state those of the latest version.

    python bench/chaos.py                 # every write of a 2-round run
    python bench/chaos.py --rounds 3 --trials 40 --json

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

from chaos import count_writes, crash_points, trial  # noqa: E402
from loop_world import build_test_corpus  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trials", type=int, default=0, help="crash points (0: every write)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = build_test_corpus(root / "corpus")
        (root / "count").mkdir()
        writes = count_writes(root / "count", corpus, a.rounds)
        points = (list(range(1, writes + 1)) if a.trials <= 0
                  else crash_points(writes, a.trials, a.seed))
        failed: dict[int, list[str]] = {}
        for i, n in enumerate(points):
            (root / f"t{n}").mkdir()
            if bad := trial(root / f"t{n}", corpus, a.rounds, n):
                failed[n] = bad
            print(f"\r{i + 1}/{len(points)} crash points, {len(failed)} with violations",
                  end="", file=sys.stderr)
    print(file=sys.stderr)
    for n, bad in failed.items():
        print(f"killed at write {n}: {'; '.join(bad)}", file=sys.stderr)
    print(json.dumps({"rounds": a.rounds, "writes_per_run": writes, "chaos_trials": len(points),
                      "chaos_violations": len(failed),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/first_lease.py runs its three ways end to end (each a process of its own) at its
smallest settings, with a compiler backend that needs no C compiler, and prints its JSON
last."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_times_each_way_of_paying_the_first_compile(
        capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("first_lease", ROOT / "bench" / "first_lease.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--backend", "aot_eager", "--family", "gpt",
                        "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                        "--seq-len", "8", "--fetch-s", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ways"].keys() == {"serial", "overlap", "restarted"}
    for res in out["ways"].values():
        assert res["first_update_s"] >= 0.1  # the fetch is waited for in every way
        assert res["steady_lease_s"] > 0 and res["compile_exposed_s"] >= 0
    assert [out["ways"][w]["warmed"] for w in ("serial", "overlap", "restarted")] == [
        False, True, False]  # only overlap compiled beside the fetch, and it did
    assert out["ratios"].keys() == {"overlap/serial", "restarted/serial"}
    assert out["seq_len"] == 8 and out["params"] > 0

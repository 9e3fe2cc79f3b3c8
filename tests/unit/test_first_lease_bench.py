"""bench/first_lease.py runs its three ways end to end (each a process of its own) at its
smallest settings, with a compiler backend that needs no C compiler, and prints its JSON
last."""

from __future__ import annotations

import json

import pytest

from tests.bench_module import load_bench


def test_the_bench_times_each_way_of_paying_the_first_compile(
        capsys: pytest.CaptureFixture[str]) -> None:
    module = load_bench("first_lease")
    assert module.main(["--device", "cpu", "--backend", "aot_eager", "--family", "gpt",
                        "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                        "--seq-len", "8", "--fetch-s", "0.1", "--ways",
                        "serial,overlap,restarted,overlap-thread", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ways"].keys() == {"serial", "overlap", "restarted", "overlap-thread"}
    for res in out["ways"].values():
        assert res["first_update_s"] >= 0.1  # the fetch is waited for in every way
        assert res["steady_lease_s"] > 0 and res["compile_exposed_s"] >= 0
    assert [out["ways"][w]["warmed"] for w in ("serial", "overlap", "restarted",
                                               "overlap-thread")] == [False, True, False, True]
    # a warmed model's leases compile nothing; a cold one's first lease does
    assert out["ways"]["overlap"]["graphs_in_leases"] == 0
    assert out["ways"]["serial"]["graphs_in_leases"] >= 1
    assert out["ratios"].keys() == {"overlap/serial", "restarted/serial",
                                    "overlap-thread/serial"}
    assert out["seq_len"] == 8 and out["params"] > 0


def test_ways_must_name_serial(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_bench("first_lease")
    for bad in ("overlap,restarted", "serial,fast"):
        with pytest.raises(SystemExit):
            module.main(["--ways", bad])
        assert "--ways" in capsys.readouterr().err

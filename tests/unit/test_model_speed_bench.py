"""bench/model_speed.py runs end to end at its smallest settings and prints its JSON last."""

from __future__ import annotations

import json

import pytest

from tests.bench_module import load_bench


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    small = ["--device", "cpu", "--steps", "2", "--leases", "1", "--batch-size", "2",
             "--seq-len", "8", "--json"]
    assert load_bench("model_speed").main([*small, *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_bench_reports_every_way_and_its_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "--families", "gpt", "--presets", "tiny,124m")
    assert {"device", "threads", "torch", "steps", "results", "skipped"} <= out.keys()
    assert out["skipped"].keys() == {"gpt/124m"}  # no such gpt preset: said, not raised
    res = out["results"]["gpt/tiny"]
    for way in ("fresh", "cached", "ckpt"):
        assert {"tok_s", "lease_ms", "step_ms", "overhead_ms"} <= res[way].keys()
        assert res[way]["tok_s"] > 0
    assert res["cached"]["compiled"] is False  # CPU: not compiled by default
    assert {"build_ms", "refill_ms", "params", "seq_len"} <= res.keys()
    assert res["phases"].keys() == {"refill_and_loss_before_ms", "pseudo_gradient_ms"}
    assert all(v > 0 for v in res["phases"].values())
    assert res["ratios"].keys() == {"cached/fresh", "ckpt/fresh", "ckpt/cached"}


def test_a_preset_over_its_time_budget_is_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "--families", "llama", "--presets", "tiny", "--max-preset-s", "0")
    assert out["results"] == {} and "estimated" in out["skipped"]["llama/tiny"]


def test_ways_leave_out_activation_checkpointing(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "--families", "gpt", "--presets", "tiny", "--ways", "cached")
    res = out["results"]["gpt/tiny"]
    assert "ckpt" not in res and res["ratios"].keys() == {"cached/fresh"}


def test_flops_per_token_is_six_per_parameter_plus_attention() -> None:
    module = load_bench("model_speed")
    from training.families import param_count, run_spec

    for family, preset in (("gpt", "gpt2"), ("llama", "124m"), ("gpt2", "124m")):
        model = run_spec(family, preset, {}, 256)  # all three: 12 layers of width 768
        assert module.flops_per_token(model, 1024) == 6 * param_count(model) + 12 * 12 * 768 * 1024

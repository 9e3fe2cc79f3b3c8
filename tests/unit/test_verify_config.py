"""The [verify] section of run.toml: defaults on, validation naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import RunConfig, VerifyParams, default_config_text, parse_config
from protocol.errors import ConfigError


def test_defaults_turn_every_layer_on() -> None:
    v = RunConfig().verify
    assert v == VerifyParams()
    assert v.norm_factor == 3.0 and v.reject_duplicates and v.usefulness_tokens == 4096
    assert v.usefulness_tolerance == 2.0
    assert 0 < v.min_improvement and 0 < v.min_improvement_fraction
    assert v.spot_check_rate == 0.1 and v.spot_check_tolerance == 0.1
    assert not v.trust_weighting and v.max_update_norm == 1000.0
    assert v.base_loss_tolerance == 0.002 and v.spot_check_loss_tolerance == 0.02
    # a lost spot check costs 1 / spot_check_rate x the shard: cheating loses in expectation
    assert RunConfig().credits.mismatch_penalty == 10.0 == 1 / v.spot_check_rate


def test_every_key_parses_and_layers_turn_off(tmp_path: Path) -> None:
    cfg = parse_config("""
[verify]
norm_factor = 0
reject_duplicates = false
usefulness_tokens = 0
usefulness_tolerance = 0.5
min_improvement = 0
min_improvement_fraction = 0.2
spot_check_rate = 0
spot_check_tolerance = 0.05
trust_weighting = true
base_loss_tolerance = 0
""", tmp_path)
    v = cfg.verify
    assert (v.norm_factor, v.reject_duplicates, v.usefulness_tokens) == (0.0, False, 0)
    assert (v.usefulness_tolerance, v.min_improvement, v.min_improvement_fraction) == \
        (0.5, 0.0, 0.2)
    assert (v.spot_check_rate, v.spot_check_tolerance, v.trust_weighting) == (0.0, 0.05, True)
    assert isinstance(v.norm_factor, float) and v.base_loss_tolerance == 0.0


@pytest.mark.parametrize("text, key", [
    ("norm_factor = 1", "[verify].norm_factor must be 0 (off) or a number > 1"),
    ("norm_factor = -3", "[verify].norm_factor must be 0 (off) or a number > 1"),
    ("reject_duplicates = 1", "[verify].reject_duplicates must be true or false"),
    ("usefulness_tokens = -1", "[verify].usefulness_tokens must be a non-negative integer"),
    ("usefulness_tokens = 4096.0", "[verify].usefulness_tokens must be a non-negative integer"),
    ("usefulness_tolerance = -0.1", "[verify].usefulness_tolerance must be a non-negative"),
    ("min_improvement = nan", "[verify].min_improvement must be a non-negative"),
    ("min_improvement_fraction = 1.5", "[verify].min_improvement_fraction must be in [0, 1]"),
    ("spot_check_rate = 1.01", "[verify].spot_check_rate must be in [0, 1]"),
    ("spot_check_tolerance = 0", "[verify].spot_check_tolerance must be a positive number"),
    ("spot_check_loss_tolerance = -1", "[verify].spot_check_loss_tolerance must be a non-neg"),
    ("base_loss_tolerance = -1e-3", "[verify].base_loss_tolerance must be a non-negative"),
    ("trust_weighting = 'yes'", "[verify].trust_weighting must be true or false"),
    ("spot_checks = 1", "unknown key [verify].spot_checks"),
])
def test_bad_values_name_the_key(text: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"[verify]\n{text}\n", tmp_path)
    assert str(err.value).startswith("run.toml: " + key), str(err.value)


def test_init_writes_the_verify_keys_with_help(tmp_path: Path) -> None:
    text = default_config_text(verify_spot_check_rate=0.25)
    section = text[text.index("[verify]"):text.index("[credits]")]
    for key in ("norm_factor", "reject_duplicates", "usefulness_tokens", "usefulness_tolerance",
                "min_improvement ", "min_improvement_fraction", "spot_check_rate",
                "spot_check_tolerance", "trust_weighting"):
        assert f"\n{key}" in section
    assert parse_config(text, tmp_path).verify.spot_check_rate == 0.25

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import (
    RunConfig, TrainParams, default_config_text, load_config, parse_config,
)
from protocol.errors import ConfigError


def err(text: str, tmp_path: Path = Path(".")) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, tmp_path)
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value)
    return str(e.value)


def test_defaults_round_trip(tmp_path: Path) -> None:
    text = default_config_text()
    assert parse_config(text, tmp_path) == RunConfig()
    (tmp_path / "run.toml").write_text(text)
    cfg = load_config(tmp_path / "run.toml")
    assert cfg == RunConfig() and cfg.base_dir == tmp_path
    assert cfg.train == TrainParams()
    assert parse_config("", tmp_path) == RunConfig()  # every key optional


def test_default_values_match_the_documented_ones() -> None:
    c = RunConfig()
    assert (c.run.id, c.run.rounds, c.model.preset, c.data.source) == ("atom-demo", 3, "tiny", "stdlib")
    assert (c.outer.lr, c.outer.momentum, c.outer.nesterov) == (1.0, 0.0, True)
    assert (c.network.fleet_port, c.network.coordinator_port) == (9092, 9093)
    assert c.aggregation.method == "mean"
    assert c.shard_tokens == c.train.inner_steps * c.train.batch_size * c.train.seq_len


def test_overrides_round_trip(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    text = default_config_text(run_id="uni-run", train_inner_steps=10, outer_nesterov=False,
                               network_fleet_port=9100, model_n_layer=6, data_source="corpus",
                               data_licence="CC-BY-4.0", data_shard_tokens=5000, train_lr=1)
    cfg = parse_config(text, tmp_path)
    assert cfg.run.id == "uni-run"
    assert cfg.train.inner_steps == 10 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.outer.nesterov is False and cfg.network.fleet_port == 9100
    assert cfg.model.n_layer == 6 and cfg.model.n_head is None
    assert cfg.data_folder() == tmp_path / "corpus" and cfg.shard_tokens == 5000


def test_default_text_rejects_bad_overrides() -> None:
    with pytest.raises(ConfigError, match="unknown override 'train_inner_stepz'"):
        default_config_text(train_inner_stepz=3)
    with pytest.raises(ConfigError, match=r"\[train\]\.inner_steps must be a positive integer"):
        default_config_text(train_inner_steps=0)


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = parse_config("[train]\ninner_steps = 5\n[outer]\nlr = 1\n", tmp_path)
    assert cfg.train.inner_steps == 5 and cfg.train.batch_size == TrainParams().batch_size
    assert cfg.outer.lr == 1.0


def test_wrong_type_names_file_key_and_value() -> None:
    assert err('[train]\ninner_steps = "ten"\n') == \
        "run.toml: [train].inner_steps must be a positive integer, got 'ten'"


def test_bools_are_not_ints() -> None:
    assert err("[run]\nrounds = true\n") == "run.toml: [run].rounds must be a positive integer, got True"
    assert "got False" in err("[outer]\nlr = false\n")
    assert "must be true or false, got 1" in err("[outer]\nnesterov = 1\n")


def test_unknown_key_and_section() -> None:
    assert err("[train]\ninner_stepz = 3\n") == "run.toml: unknown key [train].inner_stepz"
    assert err("[trian]\ninner_steps = 3\n") == "run.toml: unknown section [trian]"
    assert err("[train.sub]\nx = 1\n") == "run.toml: unknown key [train].sub"
    assert err("train = 3\n") == "run.toml: [train] must be a table"


def test_invalid_toml_names_line() -> None:
    msg = err("[run]\nrounds = 3\nid = \n")
    assert msg.startswith("run.toml: invalid TOML at line 3: ")


def test_aggregation_method_lists_choices() -> None:
    assert err('[aggregation]\nmethod = "median2"\n') == \
        "run.toml: [aggregation].method must be one of mean, trimmed_mean, median, " \
        "centered_clip, got 'median2'"


def test_aggregation_params(tmp_path: Path) -> None:
    cfg = parse_config('[aggregation]\nmethod = "centered_clip"\nclip_radius = 2\n'
                       'iterations = 5\nclip_from_previous = true\ntrim_fraction = 0\n', tmp_path)
    a = cfg.aggregation
    assert (a.method, a.clip_radius, a.iterations, a.clip_from_previous) == \
        ("centered_clip", 2.0, 5, True)
    assert a.trim_fraction == 0.0 and isinstance(a.clip_radius, float)
    text = default_config_text(aggregation_method="trimmed_mean", aggregation_trim_fraction=0.1)
    assert parse_config(text, tmp_path).aggregation.trim_fraction == 0.1


@pytest.mark.parametrize("text, key", [
    ("[network]\nfleet_port = 0", "[network].fleet_port must be a port number 1-65535"),
    ("[network]\ncoordinator_port = 65536", "[network].coordinator_port must be a port"),
    ("[network]\nfleet_port = 9093", "[network].coordinator_port must differ"),
    ("[train]\nlr = 0", "[train].lr must be a positive number"),
    ("[train]\nlr = -1e-3", "[train].lr must be a positive number"),
    ("[train]\nlr = nan", "[train].lr must be a positive number"),
    ("[outer]\nlr = inf", "[outer].lr must be a positive number"),
    ("[outer]\nmomentum = 1.0", "[outer].momentum must be in [0, 1)"),
    ("[outer]\nmomentum = -0.1", "[outer].momentum must be in [0, 1)"),
    ("[train]\nweight_decay = -0.1", "[train].weight_decay must be a non-negative number"),
    ("[data]\nshard_tokens = -1", "[data].shard_tokens must be a non-negative integer"),
    ("[data]\nval_every = 1", "[data].val_every must be an integer >= 2"),
    ("[data]\nmax_bytes = 1.5", "[data].max_bytes must be a positive integer"),
    ("[credits]\neval_per_1k_tokens = -1", "[credits].eval_per_1k_tokens must be a non-negative"),
    ("[credits]\nmismatch_penalty = -1", "[credits].mismatch_penalty must be a non-negative"),
    ("[aggregation]\ntrim_fraction = 0.5", "[aggregation].trim_fraction must be in [0, 0.5)"),
    ("[aggregation]\ntrim_fraction = -0.1", "[aggregation].trim_fraction must be in [0, 0.5)"),
    ("[aggregation]\nclip_radius = -1", "[aggregation].clip_radius must be a non-negative"),
    ("[aggregation]\niterations = 0", "[aggregation].iterations must be a positive integer"),
    ("[aggregation]\nclip_from_previous = 1", "[aggregation].clip_from_previous must be true"),
    ("[verify]\nmax_update_norm = 0", "[verify].max_update_norm must be a positive number"),
    ("[run]\nid = 'a b'", "[run].id must be 1-64 letters"),
    ("[run]\nmin_nodes = 0", "[run].min_nodes must be a positive integer"),
    ("[network]\nhost = ''", "[network].host must be a non-empty string"),
    ("[model]\nn_head = 0", "[model].n_head must be a positive integer"),
    ("[model]\nn_head = 3\nn_embd = 128", "[model].n_embd must be divisible by [model].n_head"),
    ("[ledger]\nurl = 'ledger.db'", "[ledger].url must be a database URL"),
    ("[data]\nsource = 'no-such-folder'", '[data].source must be "stdlib" or an existing folder'),
])
def test_range_errors(text: str, key: str, tmp_path: Path) -> None:
    msg = err(text + "\n", tmp_path)
    assert msg.startswith("run.toml: " + key), msg


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "run.toml"
    with pytest.raises(ConfigError, match=f"^{missing}: file not found$"):
        load_config(missing)
    bad = tmp_path / "run.toml"
    bad.write_text("[train]\nseq_len = 'x'\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: \[train\]\.seq_len must be a positive"):
        load_config(bad)


def test_ledger_url_resolves_relative_sqlite(tmp_path: Path) -> None:
    cfg = parse_config("", tmp_path)
    assert cfg.ledger_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/ledger.db"
    assert cfg.ledger_url() == cfg.ledger_url(tmp_path)  # defaults to the config's folder
    for url in ("sqlite:////abs/l.db", "sqlite:///:memory:", "postgresql+psycopg://u@h/db"):
        assert parse_config(f"[ledger]\nurl = '{url}'\n", tmp_path).ledger_url(tmp_path) == url
    q = parse_config("[ledger]\nurl = 'sqlite:///sub/l.db?timeout=5'\n", tmp_path)
    assert q.ledger_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/sub/l.db?timeout=5"


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]

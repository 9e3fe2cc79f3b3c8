"""`atom-coordinator demo` passes its flags on to the demo network (the run itself is
tested end to end in tests/e2e)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import coordinator.accounting.report as report
import coordinator.demo as demo
from coordinator.cli import app


@pytest.mark.parametrize(("args", "overrides"), [
    ([], None),
    (["--async"], {"async_enabled": True}),
    (["--ledger", "postgresql+psycopg://x/y", "--async"],
     {"ledger_url": "postgresql+psycopg://x/y", "async_enabled": True}),
    # a transformers family runs on a BPE tokenizer trained at init; the GPT demo stays bytes
    (["--family", "llama"], {"model_family": "llama", "data_tokenizer": "bpe",
                             "data_vocab_size": 2048, "train_inner_steps": 144}),
    (["--family", "qwen2", "--async"], {"async_enabled": True, "model_family": "qwen2",
                                        "data_tokenizer": "bpe", "data_vocab_size": 2048,
                                        "train_inner_steps": 144}),
    (["--family", "gpt"], None),
])
def test_demo_flags_become_run_toml_overrides(monkeypatch: pytest.MonkeyPatch,
                                              args: list[str], overrides: Any) -> None:
    seen: dict[str, Any] = {}

    def fake_run_demo(**kw: Any) -> tuple[dict[str, Any], str]:
        seen.update(kw)
        return {"seconds": 1.0, "val_loss": [2.0, 1.0]}, "finished:completed"

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo, "demo_ok", lambda summary: None)
    monkeypatch.setattr(report, "render_summary", lambda summary, console: None)
    res = CliRunner().invoke(app, ["demo", "--nodes", "2", "--rounds", "3", *args])
    assert res.exit_code == 0, res.output
    assert (seen["nodes"], seen["rounds"], seen["overrides"]) == (2, 3, overrides)


def test_an_unknown_demo_family_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo started"))
    res = CliRunner().invoke(app, ["demo", "--family", "mamba"])
    assert res.exit_code != 0 and "--family must be one of gpt, llama" in res.output
    assert "Traceback" not in res.output


def test_the_demo_overrides_make_a_valid_run_toml() -> None:
    """What `demo --family llama` asks of init is a run.toml that loads (BPE, 2048 tokens)."""
    from coordinator.cli import DEMO_BPE_VOCAB
    from coordinator.config import default_config_text, parse_config

    cfg = parse_config(default_config_text(model_family="llama", data_tokenizer="bpe",
                                           data_vocab_size=DEMO_BPE_VOCAB))
    assert (cfg.model.family, cfg.data.tokenizer, cfg.data.vocab_size) == ("llama", "bpe", 2048)
    assert parse_config(default_config_text()).data.tokenizer == "byte"  # the GPT demo's

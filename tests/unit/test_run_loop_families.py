"""The real run loop over the in-process fake network with a transformers family: the arch in
every work message, the nodes' builds, the coordinator's checks and the checkpoints all take
the same model, and it learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import loop_world
from loop_world import make_net
from test_run_loop import corpus, one_torch_thread  # noqa: F401  (fixtures)

from training.corpus import CorpusInfo

GPT_MODEL = "[model]\npreset = \"tiny\"\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 32\n"
# as small as loop_world's GPT: a shard takes milliseconds
MODELS = {
    "llama": "[model]\nfamily = \"llama\"\npreset = \"tiny\"\noverrides = { hidden_size = 32, "
             "intermediate_size = 64, num_hidden_layers = 1, num_attention_heads = 2, "
             "num_key_value_heads = 1, max_position_embeddings = 32 }\n",
    "gpt2": "[model]\nfamily = \"gpt2\"\npreset = \"tiny\"\noverrides = { n_embd = 32, "
            "n_layer = 1, n_head = 2, n_inner = 64, n_positions = 32 }\n",
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_transformers_family_trains_through_the_loop(
        tmp_path: Path, corpus: CorpusInfo, monkeypatch: pytest.MonkeyPatch,
        family: str) -> None:
    run_toml = loop_world.run_toml

    def with_family(*args: object, **kw: object) -> str:
        text = run_toml(*args, **kw)  # type: ignore[arg-type]
        assert GPT_MODEL in text
        return text.replace(GPT_MODEL, MODELS[family])

    monkeypatch.setattr(loop_world, "run_toml", with_family)
    net = make_net(tmp_path, corpus, ["honest", "honest"], rounds=2)
    try:
        net.run()  # closes the loop
        versions = net.ledger.versions()
        assert [v.version for v in versions] == [0, 1, 2]
        assert versions[2].val_loss < versions[1].val_loss < versions[0].val_loss
        ups = net.ledger.updates()
        assert ups and all(u.verdict == "accepted" for u in ups), [u.reason for u in ups]
        meta = json.loads(Path(versions[2].path).with_suffix(".json").read_text())
        assert meta["model"]["family"] == family and meta["model"]["vocab_size"] == 256
        embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
        assert embed in net.store.arrays and "lm_head.weight" not in net.store.arrays
    finally:
        net.ledger.close()

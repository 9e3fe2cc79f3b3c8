"""training.families: the built-in GPT or a transformers llama / qwen2 / gpt2 built from its
config, one forward for all, arrays that round-trip, and architectures a node refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from test_run_loop import one_torch_thread  # noqa: F401  (fixture)

from coordinator.config import parse_config
from coordinator.run.model_store import model_config, model_params
from node.limits import NodeLimits, arch_params, arch_spec, check_work
from protocol.errors import ConfigError, ProtocolError
from protocol.messages import Lease, parse_work, work_content
from training.families import (
    BYTE_VOCAB, HF_KEYS, HF_PRESETS, HFSpec, arch_of, build_model, param_count, run_spec,
    spec_from_arch,
)
from training.inner import train_inner
from training.model import PRESETS, GPTConfig
from training.state import arrays_to_model, init_arrays, model_to_arrays

HF = ("llama", "qwen2", "gpt2")


def tiny(family: str, **overrides: object) -> HFSpec:
    spec = run_spec(family, "tiny", overrides, BYTE_VOCAB)
    assert isinstance(spec, HFSpec)
    return spec


def meta_count(spec: object) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(spec).parameters())  # type: ignore[arg-type]


# -- construction and sizes ---------------------------------------------------------------

@pytest.mark.parametrize("family", HF)
def test_tiny_presets_build_from_config_small_and_with_sdpa(family: str) -> None:
    model = build_model(tiny(family))
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(("preset", "low", "high"), [
    ("small", 8e6, 20e6), ("124m", 80e6, 160e6), ("1b", 0.9e9, 1.1e9),
])
@pytest.mark.parametrize("family", HF)
def test_preset_sizes_on_the_meta_device_match_param_count(family: str, preset: str,
                                                           low: float, high: float) -> None:
    spec = run_spec(family, preset, {}, BYTE_VOCAB)
    n = meta_count(spec)
    assert low < n < high and param_count(spec) == n


def test_gpt2_124m_at_gpt2s_vocabulary_is_gpt2() -> None:
    assert param_count(run_spec("gpt2", "124m", {}, 50_257)) == 124_439_808


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": False},
    {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4},
    {"tie_word_embeddings": False, "attention_bias": True, "intermediate_size": 100},
])
def test_param_count_is_exact_for_llama_variants(overrides: dict[str, object]) -> None:
    spec = tiny("llama", **overrides)
    assert param_count(spec) == meta_count(spec)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_param_count_is_exact_untied(family: str) -> None:
    spec = tiny(family, tie_word_embeddings=False)
    assert param_count(spec) == meta_count(spec)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_builtin_gpt_is_unchanged_and_counted_exactly(name: str) -> None:
    spec = run_spec("gpt", name, {}, BYTE_VOCAB)
    assert spec == PRESETS[name]  # the demo's model: the same config as before families
    assert arch_of(spec) == dataclasses.asdict(PRESETS[name])  # no "family" key on the wire
    biased = dataclasses.replace(PRESETS["tiny"], bias=True)
    assert param_count(spec) == meta_count(spec)
    assert param_count(biased) == meta_count(biased)


# -- one interface, arrays round trip ------------------------------------------------------

@pytest.mark.parametrize("family", HF)
def test_loss_is_gpts_mean_next_token_cross_entropy(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(family)).eval()
    x = torch.randint(0, BYTE_VOCAB, (2, 17))
    logits, loss = model(x[:, :-1], x[:, 1:])  # targets already shifted, as sample_batch's
    assert logits.shape == (2, 16, BYTE_VOCAB) and loss is not None
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, BYTE_VOCAB), x[:, 1:].reshape(-1))
    assert torch.allclose(loss, want)
    assert abs(loss.item() - np.log(BYTE_VOCAB)) < 0.5  # a fresh model is near uniform
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("family", HF)
def test_arrays_round_trip_to_identical_logits_with_the_head_still_tied(family: str) -> None:
    spec = tiny(family)
    arrays = init_arrays(spec, seed=3)
    assert init_arrays(spec, seed=3).keys() == arrays.keys()
    assert all(np.array_equal(a, b) for a, b in zip(arrays.values(),
                                                    init_arrays(spec, seed=3).values()))
    embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    assert embed in arrays and "lm_head.weight" not in arrays  # the tied head appears once
    model = arrays_to_model(arrays, spec).eval()
    assert model.lm_head.weight is model.get_submodule(embed.rsplit(".", 1)[0]).weight
    again = arrays_to_model(model_to_arrays(model), spec).eval()
    x = torch.randint(0, BYTE_VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])


def test_an_untied_head_travels_as_its_own_array() -> None:
    arrays = init_arrays(tiny("llama", tie_word_embeddings=False), seed=0)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= arrays.keys()


def test_arrays_of_another_family_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        arrays_to_model(init_arrays(tiny("llama"), 0), tiny("gpt2"))


@pytest.mark.parametrize("family", HF)
def test_a_tiny_model_learns_through_the_inner_loop(family: str) -> None:
    spec = tiny(family)
    base = init_arrays(spec, seed=0)
    tokens = (np.arange(4096) % 7).astype(np.int64)  # a pattern it can learn in a few steps
    res = train_inner(base, spec, tokens, steps=12, batch_size=4, seq_len=32, lr=1e-2,
                      weight_decay=0.0, seed=1, device="cpu")
    assert res.loss_after < res.loss_before - 1.0
    assert res.pseudo_grad.keys() == base.keys()
    assert all(np.isfinite(g).all() for g in res.pseudo_grad.values())


# -- the architecture on the wire -----------------------------------------------------------

def _lease() -> Lease:
    return Lease(run_id="r", round=1, shard_id=0, kind="train", base_version=0,
                 base_digest="0" * 64, data_start=0, data_end=64, data_digest="0" * 64,
                 tokenizer_digest="7" * 64, data_manifest="8" * 64,
                 inner_steps=1, batch_size=2, seq_len=8, lr=1e-3, weight_decay=0.0, seed=1,
                 deadline=1e10, nonce="0" * 32)


@pytest.mark.parametrize("family", HF)
def test_arch_travels_as_flat_scalars_and_parses_back(family: str) -> None:
    spec = tiny(family)
    arch = parse_work(work_content(_lease(), arch_of(spec))).arch
    assert arch["family"] == family and set(arch) == {"family", *HF_KEYS[family]}
    assert spec_from_arch(arch) == spec
    assert arch_params(arch) == param_count(spec)


def test_an_old_gpt_arch_without_family_still_parses() -> None:
    cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert arch_spec(dataclasses.asdict(cfg)) == cfg
    assert arch_spec({**dataclasses.asdict(cfg), "family": "gpt"}) == cfg


@pytest.mark.parametrize(("change", "match"), [
    ({"family": "mamba"}, r"work.arch.family: must be one of gpt, llama"),
    ({"family": "Llama"}, r"work.arch.family"),
    ({"trust_remote_code": True}, r"work.arch.trust_remote_code: is not a llama config key"),
    ({"attn_implementation": "eager"}, r"work.arch.attn_implementation"),
    ({"hidden_size": 128.0}, r"work.arch.hidden_size: must be an int"),
    ({"hidden_size": True}, r"work.arch.hidden_size"),
    ({"hidden_size": "128"}, r"work.arch.hidden_size"),
    ({"hidden_size": 0}, r"work.arch.hidden_size"),
    ({"vocab_size": 1 << 30}, r"work.arch.vocab_size: must be an int in 1\.\."),
    ({"rope_theta": float("nan")}, r"work.arch.rope_theta"),
    ({"rms_norm_eps": 0.0}, r"work.arch.rms_norm_eps"),
    ({"tie_word_embeddings": 1}, r"work.arch.tie_word_embeddings: must be true or false"),
    ({"num_key_value_heads": 3}, r"work.arch.num_key_value_heads: must divide"),
    ({"hidden_size": 130}, r"work.arch.hidden_size: must be divisible"),
])
def test_a_node_refuses_what_is_not_whitelisted(change: dict[str, object], match: str) -> None:
    arch = {**arch_of(tiny("llama")), **change}
    with pytest.raises(ProtocolError, match=match):
        check_work(_lease(), arch, NodeLimits())


def test_a_missing_key_is_refused() -> None:
    arch = arch_of(tiny("qwen2"))
    del arch["num_key_value_heads"]
    with pytest.raises(ProtocolError, match="work.arch.num_key_value_heads: is missing"):
        arch_spec(arch)


def test_a_gpt_key_is_not_a_llama_key_and_back() -> None:
    with pytest.raises(ProtocolError, match="work.arch.n_layer: is not a llama config key"):
        arch_spec({**arch_of(tiny("llama")), "n_layer": 2})
    with pytest.raises(ProtocolError, match="work.arch.hidden_size: is not a gpt config key"):
        arch_spec({"n_layer": 2, "hidden_size": 64})
    with pytest.raises(ProtocolError, match="work.arch.n_head"):
        arch_spec({"n_head": 0})  # used to be a ZeroDivisionError


def test_absurd_sizes_are_refused_by_the_limits_before_anything_is_built() -> None:
    huge = {**arch_of(tiny("llama")), "num_hidden_layers": 60_000, "hidden_size": 65_536,
            "num_attention_heads": 64, "num_key_value_heads": 64, "intermediate_size": 200_000}
    with pytest.raises(ProtocolError, match="architecture.*max-model-params"):
        check_work(_lease(), huge, NodeLimits())
    one_b = arch_of(run_spec("llama", "1b", {}, BYTE_VOCAB))
    # the 1b preset fits the default limit; the spec it returns is what the worker trains
    assert check_work(_lease(), one_b, NodeLimits()) == run_spec("llama", "1b", {}, BYTE_VOCAB)
    with pytest.raises(ProtocolError, match="max-model-params"):
        check_work(_lease(), arch_of(run_spec("llama", "1b", {}, 32_000)), NodeLimits())


# -- the run's [model] --------------------------------------------------------------------

def test_run_toml_selects_a_family_preset_and_overrides() -> None:
    cfg = parse_config('[model]\nfamily = "qwen2"\npreset = "small"\n'
                       "overrides = { num_hidden_layers = 3, rope_theta = 500000 }\n")
    spec = model_config(cfg)
    assert isinstance(spec, HFSpec) and spec.family == "qwen2"
    assert spec.values == {**HF_PRESETS["qwen2"]["small"], "num_hidden_layers": 3,
                           "rope_theta": 500000.0}
    assert model_params(cfg) == param_count(spec)
    assert model_config(cfg, vocab_size=4096).vocab_size == 4096  # the tokenizer's, one place


def test_the_default_run_is_the_builtin_gpt_tiny() -> None:
    assert model_config(parse_config("")) == PRESETS["tiny"]
    assert model_config(parse_config("[model]\nn_layer = 3")).n_layer == 3


@pytest.mark.parametrize(("toml", "match"), [
    ('family = "mamba"', r"\[model\]\.family must be one of gpt, llama, qwen2, gpt2"),
    ('family = "llama"\npreset = "gpt2"', r"\[model\]\.preset must be one of tiny, small"),
    ('family = "llama"\noverrides = { n_layer = 2 }',
     r"\[model\]\.overrides\.n_layer is not a llama config key"),
    ('family = "llama"\noverrides = { hidden_size = 2.5 }',
     r"\[model\]\.overrides\.hidden_size must be an int"),
    ('family = "llama"\noverrides = { vocab_size = 1000 }',
     r"\[model\]\.overrides\.vocab_size comes from the run's tokenizer"),
    ('family = "llama"\noverrides = { hidden_size = "big" }',
     r"\[model\]\.overrides must be a table of numbers"),
    ('family = "llama"\nn_layer = 3', r"\[model\]\.n_layer applies to family gpt only"),
    ("overrides = { n_layer = 3 }", r"\[model\]\.overrides apply to the transformers"),
])
def test_a_bad_model_section_is_one_config_error_line(toml: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        parse_config("[model]\n" + toml)
    assert "\n" not in str(err.value)


def test_a_bad_gpt_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[model\]\.preset must be one of tiny, small, gpt2"):
        model_config(parse_config('[model]\npreset = "huge"'))

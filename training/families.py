"""Which model a run trains: the built-in GPT, or a transformers causal LM built from its config.

The one place a model is built from an architecture description. ``family`` is one of:

=======  ==========================================  =========================================
family   model                                       architecture keys (all required)
=======  ==========================================  =========================================
gpt      ``training.model.GPT`` (the demo's)         GPTConfig's fields, each optional
llama    ``transformers`` LlamaForCausalLM           ``HF_KEYS["llama"]``
qwen2    ``transformers`` Qwen2ForCausalLM           ``HF_KEYS["qwen2"]``
gpt2     ``transformers`` GPT2LMHeadModel            ``HF_KEYS["gpt2"]``
=======  ==========================================  =========================================

An architecture travels in a work message as a flat dict of scalars (``arch_of``): GPTConfig's
fields with no ``family`` key for the built-in GPT (what nodes have always received), or
``{"family": "llama", "hidden_size": 768, ...}`` with every key of the family's whitelist.
A node builds nothing else: ``spec_from_arch`` refuses an unknown family, an unknown key, a
value of the wrong type or outside its bounds (``ArchError``, which the node reports as a
``ProtocolError``), and ``param_count`` sizes the model from the numbers alone, before anything
is built, for the node's limits. Everything a key does not say is fixed here: SDPA attention,
no dropout, no KV cache, fp32 weights, no special token ids; nothing is ever downloaded.

Presets per transformers family (parameters at the byte vocabulary, 256; a BPE vocabulary adds
``vocab_size x width`` once, the head being tied):

======  =========================================================  ======  ======  =======
preset  shape                                                      llama   qwen2   gpt2
======  =========================================================  ======  ======  =======
tiny    2 x 128, 4 heads: CPU tests and the demo                   0.43M   0.43M   0.43M
small   6 x 384, 6 heads (llama/qwen2: 2 KV heads)                 13M     13M     10.7M
124m    12 x 768, 12 heads: GPT-2 small's layers                   113M    113M    85M
1b      Llama-3.2-1B / Qwen2.5-1.5B widths at 20 of its 28 layers  0.97B   0.94B   0.98B
        / GPT-2 XL widths at 32 of its 48 layers
======  =========================================================  ======  ======  =======

(``gpt2`` ``124m`` at GPT-2's own vocabulary, 50,257, is GPT-2's 124,439,808 parameters.)

Importing this module imports neither torch nor transformers (the coordinator's config checks
a run's ``[model]`` with it); ``build_model`` imports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch

    from training.model import GPTConfig

__all__ = [
    "ArchError", "BYTE_VOCAB", "FAMILIES", "HF_KEYS", "HF_PRESETS", "HFSpec", "ModelSpec",
    "arch_of", "build_model", "hf_model", "param_count", "run_spec", "spec_from_arch",
]

FAMILIES = ("gpt", "llama", "qwen2", "gpt2")
BYTE_VOCAB = 256  # training.tokenizer.ByteTokenizer

Scalar = Union[int, float, bool]


class ArchError(ValueError):
    """An architecture this module will not build; ``key`` names the offending key and the
    message says what it must be. The node maps it to ``ProtocolError``, the coordinator's
    config to ``ConfigError``."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"{key}: {what}")
        self.key, self.what = key, what


@dataclass(frozen=True)
class _Key:
    kind: type  # int, float or bool
    low: float = 1
    high: float = 1 << 20
    low_ok: bool = False  # floats: may equal ``low`` (a dropout of 0)

    def check(self, key: str, v: Any) -> Scalar:
        if self.kind is bool:
            if not isinstance(v, bool):
                raise ArchError(key, f"must be true or false, got {v!r}")
            return v
        if self.kind is int:
            if type(v) is not int or not self.low <= v <= self.high:
                raise ArchError(key, f"must be an int in {self.low:g}..{self.high:g}, got {v!r}")
            return v
        above = v >= self.low if self.low_ok else v > self.low
        if type(v) not in (int, float) or not math.isfinite(v) or not above or v >= self.high:
            interval = f"{'[' if self.low_ok else '('}{self.low:g}, {self.high:g})"
            raise ArchError(key, f"must be a number in {interval}, got {v!r}")
        return float(v)


_VOCAB = _Key(int, 1, 1 << 24)
_WIDTH = _Key(int, 1, 1 << 16)
_COUNT = _Key(int, 1, 1 << 16)  # layers, heads: the parameter limit bounds them in practice
_LENGTH = _Key(int, 1, 1 << 20)  # context length
_EPS = _Key(float, 0.0, 1.0)
_THETA = _Key(float, 0.0, 1e12)
_FLAG = _Key(bool)

_ROPE = {"vocab_size": _VOCAB, "hidden_size": _WIDTH, "intermediate_size": _Key(int, 1, 1 << 18),
         "num_hidden_layers": _COUNT, "num_attention_heads": _COUNT,
         "num_key_value_heads": _COUNT, "max_position_embeddings": _LENGTH,
         "rope_theta": _THETA, "rms_norm_eps": _EPS, "tie_word_embeddings": _FLAG}
# The whitelist: the only config keys a node passes to transformers.
HF_KEYS: dict[str, dict[str, _Key]] = {
    "llama": {**_ROPE, "attention_bias": _FLAG, "mlp_bias": _FLAG},
    "qwen2": dict(_ROPE),  # q, k, v always carry biases
    "gpt2": {"vocab_size": _VOCAB, "n_embd": _WIDTH, "n_layer": _COUNT, "n_head": _COUNT,
             "n_positions": _LENGTH, "n_inner": _Key(int, 1, 1 << 18),
             "layer_norm_epsilon": _EPS, "tie_word_embeddings": _FLAG},
}
_GPT_KEYS = {"vocab_size": _VOCAB, "block_size": _LENGTH, "n_layer": _COUNT, "n_head": _COUNT,
             "n_embd": _WIDTH, "dropout": _Key(float, 0.0, 1.0, low_ok=True), "bias": _FLAG}


def _rope(width: int, inter: int, layers: int, heads: int, kv: int, pos: int,
          theta: float, eps: float) -> dict[str, Scalar]:
    return {"vocab_size": BYTE_VOCAB, "hidden_size": width, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": pos, "rope_theta": theta,
            "rms_norm_eps": eps, "tie_word_embeddings": True}


def _gpt2(width: int, layers: int, heads: int, pos: int) -> dict[str, Scalar]:
    return {"vocab_size": BYTE_VOCAB, "n_embd": width, "n_layer": layers, "n_head": heads,
            "n_positions": pos, "n_inner": 4 * width, "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True}


_NO_BIAS = {"attention_bias": False, "mlp_bias": False}
HF_PRESETS: dict[str, dict[str, dict[str, Scalar]]] = {
    "llama": {
        "tiny": {**_rope(128, 384, 2, 4, 2, 128, 10_000.0, 1e-5), **_NO_BIAS},
        "small": {**_rope(384, 1536, 6, 6, 2, 256, 10_000.0, 1e-5), **_NO_BIAS},
        "124m": {**_rope(768, 3072, 12, 12, 12, 1024, 10_000.0, 1e-5), **_NO_BIAS},
        "1b": {**_rope(2048, 8192, 16, 32, 8, 2048, 500_000.0, 1e-5), **_NO_BIAS},
    },
    "qwen2": {
        "tiny": _rope(128, 384, 2, 4, 2, 128, 1_000_000.0, 1e-6),
        "small": _rope(384, 1536, 6, 6, 2, 256, 1_000_000.0, 1e-6),
        "124m": _rope(768, 3072, 12, 12, 12, 1024, 1_000_000.0, 1e-6),
        "1b": _rope(1536, 8960, 20, 12, 2, 2048, 1_000_000.0, 1e-6),
    },
    "gpt2": {
        "tiny": _gpt2(128, 2, 4, 128),
        "small": _gpt2(384, 6, 6, 256),
        "124m": _gpt2(768, 12, 12, 1024),
        "1b": _gpt2(1600, 32, 25, 1024),
    },
}


@dataclass(frozen=True)
class HFSpec:
    """A transformers causal LM: its family and every whitelisted config key, checked."""

    family: str
    values: Mapping[str, Scalar] = field(hash=False)

    @property
    def block_size(self) -> int:
        """The longest sequence the model takes (``GPTConfig.block_size``'s counterpart)."""
        key = "n_positions" if self.family == "gpt2" else "max_position_embeddings"
        return int(self.values[key])

    @property
    def vocab_size(self) -> int:
        return int(self.values["vocab_size"])


ModelSpec = Union["GPTConfig", HFSpec]


def _check_hf(family: str, values: Mapping[str, Any]) -> dict[str, Scalar]:
    keys = HF_KEYS[family]
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ArchError(unknown[0], f"is not a {family} config key this network builds "
                                    f"(known: {', '.join(keys)})")
    missing = [k for k in keys if k not in values]
    if missing:
        raise ArchError(missing[0], f"is missing: a {family} architecture names every key")
    v = {k: keys[k].check(k, values[k]) for k in keys}
    width, heads = ("n_embd", "n_head") if family == "gpt2" else (
        "hidden_size", "num_attention_heads")
    if v[width] % v[heads]:
        raise ArchError(width, f"must be divisible by {heads}, got {v[width]} and {v[heads]}")
    if family != "gpt2":
        if v[heads] % v["num_key_value_heads"]:
            raise ArchError("num_key_value_heads", f"must divide num_attention_heads, got "
                            f"{v['num_key_value_heads']} and {v[heads]}")
        if (v[width] // v[heads]) % 2:
            raise ArchError(width, f"must give an even head size (RoPE): {v[width]} / "
                                   f"{v[heads]} heads is {v[width] // v[heads]}")
    return v


def _check_gpt(values: Mapping[str, Any]) -> dict[str, Scalar]:
    unknown = sorted(set(values) - set(_GPT_KEYS))
    if unknown:
        raise ArchError(unknown[0], f"is not a gpt config key (known: {', '.join(_GPT_KEYS)})")
    v = {k: _GPT_KEYS[k].check(k, x) for k, x in values.items()}
    defaults = {f.name: f.default for f in fields(_gpt_config_class())}
    full = {**defaults, **v}
    if full["n_embd"] % full["n_head"]:
        raise ArchError("n_embd", f"must be divisible by n_head, got {full['n_embd']} "
                                  f"and {full['n_head']}")
    return v


def _gpt_config_class() -> type[GPTConfig]:
    from training.model import GPTConfig  # torch: only where a GPT is described

    return GPTConfig


def spec_from_arch(arch: Mapping[str, Any]) -> ModelSpec:
    """The model a work message's ``arch`` describes, checked against the whitelist.

    Raises
    ------
    ArchError
        An unknown family or key, a value of the wrong type or out of bounds, a missing key
        (transformers families), or heads that do not divide the width.
    """
    family = arch.get("family", "gpt")
    if family not in FAMILIES:
        raise ArchError("family", f"must be one of {', '.join(FAMILIES)}, got {family!r}")
    values = {k: v for k, v in arch.items() if k != "family"}
    if family == "gpt":
        return _gpt_config_class()(**_check_gpt(values))
    return HFSpec(family, _check_hf(family, values))


def run_spec(family: str, preset: str, overrides: Mapping[str, Any], vocab_size: int,
             gpt_dims: Mapping[str, int] | None = None) -> ModelSpec:
    """A run's model: ``family``'s ``preset``, with ``overrides`` (transformers families) or
    ``gpt_dims`` (the built-in GPT's n_layer / n_head / n_embd / block_size) on top, at the
    run's ``vocab_size``. The vocabulary is never an override: it is the tokenizer's.

    Raises
    ------
    ArchError
        ``key`` is ``family``, ``preset``, ``vocab_size`` or ``overrides.<key>``.
    """
    if family not in FAMILIES:
        raise ArchError("family", f"must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "gpt":
        if overrides:
            raise ArchError("overrides", "apply to the transformers families; family gpt "
                                         "takes n_layer, n_head, n_embd, block_size")
        from training.model import PRESETS

        if preset not in PRESETS:
            raise ArchError("preset", f"must be one of {', '.join(PRESETS)} for family gpt, "
                                      f"got {preset!r}")
        import dataclasses

        values = {**dataclasses.asdict(PRESETS[preset]), **(gpt_dims or {}),
                  "vocab_size": vocab_size}
        return _gpt_config_class()(**_check_gpt(values))
    if gpt_dims:
        raise ArchError(next(iter(gpt_dims)), f"applies to family gpt only; for {family} "
                                              "use [model].overrides")
    presets = HF_PRESETS[family]
    if preset not in presets:
        raise ArchError("preset", f"must be one of {', '.join(presets)} for family {family}, "
                                  f"got {preset!r}")
    if "vocab_size" in overrides:
        raise ArchError("overrides.vocab_size", "comes from the run's tokenizer, not overrides")
    try:
        _VOCAB.check("vocab_size", vocab_size)
        return HFSpec(family, _check_hf(family, {**presets[preset], **overrides,
                                                 "vocab_size": vocab_size}))
    except ArchError as err:
        key = err.key if err.key == "vocab_size" else f"overrides.{err.key}"
        raise ArchError(key, err.what) from None


def arch_of(spec: ModelSpec) -> dict[str, Scalar]:
    """``spec`` as a work message carries it: flat scalars (see the module docstring)."""
    if isinstance(spec, HFSpec):
        return {"family": spec.family, **spec.values}
    import dataclasses

    return dataclasses.asdict(spec)  # no "family": what every node has always received


def param_count(spec: ModelSpec) -> int:
    """Parameters ``build_model(spec)`` allocates (the tied head counted once), from the
    numbers alone: O(1), nothing built or imported, so a node sizes a description it has not
    yet decided to trust. Matches the built models exactly (tests/unit/test_model_families.py
    builds each family on the meta device to check)."""
    if not isinstance(spec, HFSpec):
        n, b = spec.n_embd, int(spec.bias)
        per_layer = 12 * n * n + b * 9 * n + 2 * n * (1 + b)  # attn 4n^2, mlp 8n^2, 2 norms
        return (spec.vocab_size + spec.block_size) * n + spec.n_layer * per_layer + n * (1 + b)
    v = spec.values
    head = 0 if v["tie_word_embeddings"] else 1
    if spec.family == "gpt2":
        n, inner = v["n_embd"], v["n_inner"]
        per_layer = (4 * n                 # ln_1, ln_2 (weight + bias)
                     + 3 * n * n + 3 * n   # c_attn
                     + n * n + n           # attn.c_proj
                     + 2 * n * inner + inner + n)  # mlp.c_fc, mlp.c_proj
        return ((1 + head) * v["vocab_size"] * n + v["n_positions"] * n
                + v["n_layer"] * per_layer + 2 * n)
    h, inter = v["hidden_size"], v["intermediate_size"]
    kv = v["num_key_value_heads"] * (h // v["num_attention_heads"])
    qkv_bias = spec.family == "qwen2" or bool(v.get("attention_bias"))
    o_bias = bool(v.get("attention_bias"))  # qwen2: q, k, v only
    mlp_bias = bool(v.get("mlp_bias"))
    per_layer = (2 * h * h + 2 * h * kv + qkv_bias * (h + 2 * kv) + o_bias * h
                 + 3 * h * inter + mlp_bias * (2 * inter + h) + 2 * h)
    return (1 + head) * v["vocab_size"] * h + v["num_hidden_layers"] * per_layer + h


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The model ``spec`` describes, freshly initialised from torch's global RNG, in fp32 on
    the current default device (``with torch.device("meta"):`` builds it without memory).

    A transformers family comes behind ``training.causal_lm.CausalLM``: GPT's
    ``forward(idx, targets) -> (logits, loss)`` and the transformers parameter names.
    """
    if not isinstance(spec, HFSpec):
        from training.model import GPT

        return GPT(spec)
    from training.causal_lm import CausalLM

    return CausalLM(hf_model(spec), spec.block_size)


def hf_model(spec: HFSpec) -> Any:
    """The transformers ``PreTrainedModel`` (``...ForCausalLM``, head included) ``spec``
    describes, freshly initialised: what ``build_model`` wraps, and what an export saves."""
    import torch
    import transformers

    v = dict(spec.values)
    common: dict[str, Any] = dict(use_cache=False, bos_token_id=None, eos_token_id=None,
                                  pad_token_id=None)
    if spec.family == "gpt2":
        config = transformers.GPT2Config(**v, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         **common)
    else:
        rope = {"rope_type": "default", "rope_theta": v.pop("rope_theta")}
        cls = transformers.LlamaConfig if spec.family == "llama" else transformers.Qwen2Config
        config = cls(**v, rope_parameters=rope, attention_dropout=0.0, **common)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                         dtype=torch.float32)

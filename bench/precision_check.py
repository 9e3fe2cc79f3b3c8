"""How far an honest node's results drift from the coordinator's CPU fp32 recomputation:
the numbers behind ``[verify] base_loss_tolerance``, ``spot_check_tolerance`` and
``spot_check_loss_tolerance``. Prints one JSON object.

    python bench/precision_check.py                # CUDA bf16 if there is a GPU, else CPU bf16
    python bench/precision_check.py --steps 60     # shorter

For a young model (the initial weights) and a trained one (after one shard), one shard is
trained twice from the same base, seed and data: on the coordinator's path (CPU, fp32) and
as a GPU node trains it (CUDA, bf16 autocast; without a GPU, CPU bf16 autocast stands in).
Reported per case: the pseudo-gradients' relative L2 distance, the gap between the two
local models' losses on a sample of the shard (nats), the gap between the reported
``loss_before`` values, and for contrast a result of three quarters of the steps (what a
node skipping work sends) against the full one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.inner as inner  # noqa: E402
import training.model_cache as model_cache  # noqa: E402
from coordinator.config import RunConfig  # noqa: E402
from coordinator.run.model_store import model_config  # noqa: E402
from coordinator.verify.round_judge import _local  # noqa: E402
from coordinator.verify.scoring import Span, windows as span_windows  # noqa: E402
from coordinator.verify.rules import rel_l2  # noqa: E402
from training.corpus import build_stdlib_corpus  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.state import init_arrays  # noqa: E402


@contextlib.contextmanager
def _cpu_bf16(_device: object) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="inner steps (default: the run's)")
    p.add_argument("--corpus-dir", default=str(Path(tempfile.gettempdir()) / "atom-bench-byz"))
    a = p.parse_args()
    cfg = RunConfig()
    gpt, t = model_config(cfg), cfg.train
    steps = a.steps or t.inner_steps
    cuda = torch.cuda.is_available()
    corpus = build_stdlib_corpus(a.corpus_dir, max_bytes=3_000_000, val_every=20)
    tokens = np.asarray(corpus.tokens())
    lo, _ = corpus.train_range
    n = steps * t.batch_size * t.seq_len

    def train(base, shard, device: str, bf16: bool, k: int = steps):  # type: ignore[no-untyped-def]
        saved = model_cache.autocast
        if bf16 and device == "cpu":
            model_cache.autocast = _cpu_bf16  # CUDA autocasts by itself
        try:
            return inner.train_inner(base, gpt, shard, steps=k, batch_size=t.batch_size,
                                     seq_len=t.seq_len, lr=t.lr, weight_decay=t.weight_decay,
                                     seed=1, device=device)
        finally:
            model_cache.autocast = saved

    def loss(base, update, windows) -> float:  # type: ignore[no-untyped-def]
        return evaluate(_local(base, update), gpt, windows, seq_len=t.seq_len,
                        batch_size=t.batch_size, device="cpu").mean_loss

    out: dict = {"torch": torch.__version__, "node": "cuda bf16" if cuda else "cpu bf16",
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": steps}
    young = init_arrays(gpt, 0)
    first = train(young, tokens[lo:lo + n], "cpu", False)
    trained = _local(young, first.pseudo_grad)
    for name, base in (("young", young), ("trained", trained)):
        start = lo + n
        shard = tokens[start:start + n]
        rng = random.Random(0)
        windows = span_windows(tokens, Span(0, tuple(rng.randrange(start, start + n - t.seq_len)
                                                     for _ in range(4096 // t.seq_len))),
                               t.seq_len)
        ref = train(base, shard, "cpu", False)
        node = train(base, shard, "cuda" if cuda else "cpu", True)
        skip = train(base, shard, "cpu", False, k=steps * 3 // 4)
        ref_loss = loss(base, ref.pseudo_grad, windows)
        out[name] = {
            "rel_l2": rel_l2(node.pseudo_grad, ref.pseudo_grad),
            "shard_loss_gap": loss(base, node.pseudo_grad, windows) - ref_loss,
            "loss_before_gap": node.loss_before - ref.loss_before,
            "three_quarters_rel_l2": rel_l2(skip.pseudo_grad, ref.pseudo_grad),
            "three_quarters_shard_loss_gap": loss(base, skip.pseudo_grad, windows) - ref_loss,
        }
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

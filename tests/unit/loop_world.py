"""A run loop over the in-process fake network, for the loop's tests and benchmarks: the test
run's config (a 1-layer, 32-wide model, 3 inner steps: a shard takes milliseconds), a seeded
corpus, and ``make_net`` wiring ledger, fake transport, model store and ``RunLoop``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from fake_network import FakeClock, FakeNode, FakeTransport, enroll

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig, parse_config
from coordinator.ledger import Ledger
from coordinator.run.async_loop import make_run_loop
from coordinator.run.loop import RunLoop
from coordinator.run.model_store import ModelStore
from protocol.blobstore import BlobDir
from training.corpus import CorpusInfo, build_folder_corpus

EVAL_TOKENS = 1024
SHARD_TOKENS = 3 * 2 * 32  # inner_steps * batch_size * seq_len


NO_DUPLICATES = "spot_check_rate = 0\neval_quorum_rate = 0"


def run_toml(rounds: int, wait_s: float = 0, verify: str = NO_DUPLICATES,
             extra: str = "", run_id: str = "loop-test", train: str = "",
             outer: str = "lr = 0.7\nmomentum = 0.9") -> str:
    """The test run; spot checks and eval quorum off unless ``verify`` (the [verify]
    section's body) says otherwise, so these tests see one lease per node and round (and
    eval range); ``train`` lines set or override [train] keys; ``extra`` sections follow."""
    keys = {line.split("=")[0].strip(): line for line in train.splitlines() if "=" in line}
    base = {"inner_steps": "inner_steps = 3", "batch_size": "batch_size = 2",
            "seq_len": "seq_len = 32", "lr": "lr = 1e-2", "deadline_s": "deadline_s = 10"}
    train = "\n".join({**base, **keys}.values())
    # the replies' own checks in the loop: the same verdicts in every run, no processes
    in_loop = "" if "check_processes" in verify else "check_processes = 0"
    return f"""
[run]
id = "{run_id}"
rounds = {rounds}
min_nodes = 1
wait_for_nodes_s = {wait_s}

[model]
preset = "tiny"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32

[data]
eval_tokens = {EVAL_TOKENS}

[train]
{train}

[outer]  # DiLoCo's outer step, so the momentum paths are exercised whatever the defaults
{outer}

[verify]
{in_loop}
{verify}
{extra}
"""


@dataclass
class Net:
    cfg: RunConfig
    ledger: Ledger
    store: ModelStore
    transport: FakeTransport
    clock: FakeClock
    nodes: list[FakeNode]
    loop: RunLoop

    def run(self) -> None:
        self.loop.run()


def make_net(tmp_path: Path, corpus: CorpusInfo, specs: list, *, rounds: int = 2,
             wait_s: float = 0, nodes: list[FakeNode] | None = None,
             ledger_url: str | None = None,
             verify: str = NO_DUPLICATES, extra: str = "", run_id: str = "loop-test",
             seed: int = 0, issuer: ReceiptIssuer | None = None, train: str = "",
             outer: str = "lr = 0.7\nmomentum = 0.9") -> Net:
    """A loop over ``specs`` nodes, or over already enrolled ``nodes`` on the same ledger;
    ``verify`` is the body of the [verify] section, ``extra`` more sections, ``seed`` seeds
    the loop's choices, ``issuer`` signs receipts; ``ledger_url`` picks another database."""
    cfg = parse_config(run_toml(rounds, wait_s, verify, extra, run_id, train, outer), tmp_path)
    ledger = Ledger(ledger_url or f"sqlite:///{tmp_path / 'ledger.db'}")
    nodes = nodes if nodes is not None else enroll(ledger, specs)
    clock = FakeClock()
    blobs = BlobDir(tmp_path / "blobs")
    transport = FakeTransport(nodes, clock, blobs)
    store = ModelStore.open(tmp_path / "checkpoints", cfg, ledger, corpus=corpus)
    loop = make_run_loop(cfg, ledger, transport, store, corpus, clock=clock, sleep=clock.sleep,
                         rng=random.Random(seed), issuer=issuer, blobs=blobs)
    return Net(cfg, ledger, store, transport, clock, nodes, loop)


def build_test_corpus(root: Path, files: int = 20) -> CorpusInfo:
    """~6 KB of seeded pseudo-English per file (120 KB in the default 20 files); every 5th
    file is validation."""
    words = ("the cat sat on a mat and the dog ran to the red ball while a bird sang "
             "in the old tree by the river").split()
    rng = random.Random(7)
    src = root / "text"
    src.mkdir(parents=True)
    for i in range(files):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
                 for _ in range(120)]
        (src / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return build_folder_corpus(src, root / "built", val_every=5, licence="CC0-1.0")

"""A coordinator with credited work, for the credit statement tests: the real gRPC service
with TLS, a ledger filled through the real judging path (signed updates, the verifier, receipts
signed with the run's coordinator key), and ``atom-node credits`` run in-process against it.

Only the SuperLink is faked (enrollment needs a Flower node id); nothing trains: train replies
carry zero pseudo-gradients of a made-up shape, which the verifier accepts as well-formed.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from coordinator.accounting.credits import ReceiptIssuer
from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.rundir import RunDir, create_invite, init_run
from coordinator.services.enrollment import Enroller
from coordinator.services.grpc_service import CoordinatorService, serve
from coordinator.verify.record import judge_reply
from node.cli import app as node_app
from node.enroll import enroll
from node.identity import NodeHome
from protocol.compression import encode
from protocol.digest import digest_arrays
from protocol.messages import EVAL_WINDOWS, Lease, Update, UpdateMetrics, reply_content
from protocol.processes import free_port
from protocol.signing import load_private_key, sign_update
from training.evaluate import eval_windows

__all__ = ["TRAIN_TOKENS", "World", "credits", "make_world", "ok_json", "one_line_failure"]

SHAPES = {"w": ((2, 3), "<f4")}
TRAIN_TOKENS = 2 * 2 * 8  # inner_steps * batch_size * seq_len of the leases below


@dataclass
class World:
    rd: RunDir
    cfg: RunConfig
    ledger: Ledger
    address: str
    issuer: ReceiptIssuer
    homes: dict[str, NodeHome]
    ids: dict[str, int]
    shards: Iterator[int]

    def work(self, name: str, kind: str, *, late: bool = False, tokens: int = 50,
             signer: str | None = None) -> int:
        """One lease for ``name`` answered and judged for real; returns the update row id."""
        node_id, now = self.ids[name], time.time()
        shard = next(self.shards)
        lease = Lease(run_id=self.cfg.run.id, round=1 + shard // 10, shard_id=shard, kind=kind,
                      base_version=0, base_digest="a" * 64, data_start=shard * 100,
                      # an eval range predicts all its tokens but the first
                      data_end=shard * 100 + (64 if kind == "train" else tokens + 1),
                      data_digest="b" * 64, inner_steps=2,
                      tokenizer_digest="7" * 64, data_manifest="8" * 64,
                      batch_size=2, seq_len=8, lr=1e-3, weight_decay=0.0, seed=shard,
                      deadline=now + (-1.0 if late else 60.0), nonce=secrets.token_hex(16))
        row = self.ledger.record_lease(
            run_id=lease.run_id, round=lease.round, shard_id=shard, kind=kind, node_id=node_id,
            base_version=0, nonce=lease.nonce, data_start=lease.data_start,
            data_end=lease.data_end, deadline=lease.deadline)
        # eval: 4.0 nats on every prediction, window by window (protocol.messages)
        windows = [4.0 * (e - s - 1) for s, e in eval_windows(tokens + 1, lease.seq_len)]
        arrays = (encode({"w": np.zeros((2, 3), np.float32)}, self.cfg.codec())
                  if kind == "train" else {EVAL_WINDOWS: np.array(windows)})
        metrics = (UpdateMetrics(TRAIN_TOKENS, 2, 5.0, 4.5, 0.5) if kind == "train"
                   else UpdateMetrics(tokens, 0, 4.0, 4.0, 0.2))
        key = load_private_key(self.homes[signer or name].key_path)
        update = sign_update(Update(lease, node_id, digest_arrays(arrays), metrics), key)
        judged = judge_reply(
            reply_content(update, arrays), lease=lease, lease_row_id=row.id, node_id=node_id,
            public_key_pem=self.ledger.node(node_id).public_key_pem.encode(), version=0,
            shapes=SHAPES, cfg=self.cfg, ledger=self.ledger, now=now, issuer=self.issuer)
        assert judged.verdict.accepted == (not late and signer is None), judged.verdict
        return self.ledger.updates(node_id=node_id)[-1].id


@contextmanager
def make_world(tmp_path: Path) -> Iterator[World]:
    """Coordinator service on a free port, nodes a, b (Uni B), c enrolled, work judged."""
    port = free_port()
    rd = init_run(tmp_path / "run", run_id="credits-test", network_coordinator_port=port)
    cfg = rd.config()
    ledger = rd.ledger(cfg)
    flower_ids = itertools.count(2**63 + 5)
    enroller = Enroller(ledger, lambda pem, name: next(flower_ids))
    issuer = ReceiptIssuer.load(rd.key_path)
    service = CoordinatorService(enroller, cfg.run.id, rd.fleet_address(cfg), rd.public_key_pem(),
                                 issuer)
    server = serve(service, "127.0.0.1", port, rd.tls.server_cert.read_bytes(),
                   rd.tls.server_key.read_bytes())
    try:
        w = World(rd, cfg, ledger, f"127.0.0.1:{port}", issuer, {},
                  {}, itertools.count(1))
        for name, inst in (("a", "Uni A"), ("b", "Uni B"), ("c", "Uni A")):
            w.homes[name] = NodeHome(tmp_path / "nodes" / name)
            w.ids[name] = enroll(None, create_invite(rd, inst), w.homes[name], name).node_id
        w.work("a", "train")
        w.work("a", "eval", tokens=50)
        w.work("a", "train")
        w.work("a", "train", late=True)  # past its deadline: rejected as late, earns nothing
        w.work("a", "train", signer="b")  # bad signature: earns nothing
        w.work("b", "train")
        w.work("b", "eval", tokens=64)
        yield w
    finally:
        server.stop(grace=None).wait()
        ledger.close()


def credits(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(node_app, ["credits", *map(str, args)], catch_exceptions=False)


def ok_json(*args: object) -> dict:
    result = credits(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_line_failure(*args: object) -> tuple[int, str]:
    result = credits(*args)
    assert result.exit_code != 0 and result.stdout == ""  # nothing shown as valid
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return result.exit_code, lines[0]



"""A user's mistake is one ``error:`` line on stderr and a non-zero exit, never a traceback.

The CLIs run as real subprocesses (``python -m coordinator`` / ``python -m node``), in their own
session so a stray child could be killed with them. Node commands get ``--home`` *and*
``ATOM_NODE_HOME`` (and ``HOME``) under ``tmp_path``: nothing touches ``~/.atom-node``.
Corrupt checkpoints are checked in-process on ``ModelStore.open`` / ``load_checkpoint``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.run.model_store import ModelStore
from coordinator.rundir import RunDir, init_run
from node.identity import NodeHome
from protocol.errors import CheckpointError, ConfigError
from protocol.invite import InviteToken, new_secret
from protocol.processes import free_port
from training.checkpoint import load_checkpoint

CONFIG, ENROLLMENT, CHECKPOINT, LEDGER, NETWORK = 2, 5, 6, 7, 8  # protocol.errors exit codes
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


def _cli(tmp_path: Path, module: str, *args: str) -> Result:
    env = dict(os.environ, HOME=str(tmp_path / "user-home"),
               ATOM_NODE_HOME=str(tmp_path / "env-node-home"), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=_TIMEOUT_S)
    finally:
        if proc.poll() is None:  # it hung: take its whole group down, then reap
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return Result(proc.returncode, out, err)


def _assert_one_error_line(res: Result, code: int, *fragments: str) -> str:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.rc == code, (res.rc, res.stderr)
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- atom-coordinator ---------------------------------------------------------------------


def _run_dir_with(tmp_path: Path, run_toml: str) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.toml").write_text(run_toml)
    return d


def test_start_without_run_toml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = _cli(tmp_path, "coordinator", "start", str(tmp_path / "empty"))
    _assert_one_error_line(res, CONFIG, "not a run directory", "atom-coordinator init")


def test_invite_for_a_missing_dir(tmp_path: Path) -> None:
    res = _cli(tmp_path, "coordinator", "invite", str(tmp_path / "nope"), "--institution", "U")
    _assert_one_error_line(res, CONFIG, "not a run directory")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(("run_toml", "names"), [
    ("[run\nid = 'x'\n", "invalid TOML at line 1"),
    ("[run]\nbogus = 1\n", "unknown key [run].bogus"),
    ("[train]\ninner_steps = \"ten\"\n", "[train].inner_steps must be a positive integer"),
    ("[network]\ncoordinator_port = true\n", "[network].coordinator_port"),
    ("[nope]\nx = 1\n", "unknown section [nope]"),
], ids=["syntax", "unknown-key", "wrong-type", "bool-port", "unknown-section"])
def test_invite_with_malformed_run_toml(tmp_path: Path, run_toml: str, names: str) -> None:
    d = _run_dir_with(tmp_path, run_toml)
    res = _cli(tmp_path, "coordinator", "invite", str(d), "--institution", "U")
    line = _assert_one_error_line(res, CONFIG, names)
    assert "run.toml" in line
    assert not (d / "ledger.db").exists()  # nothing was opened on a bad config


def test_start_with_malformed_run_toml(tmp_path: Path) -> None:
    d = _run_dir_with(tmp_path, "[train]\nbatch_size = -3\n")
    res = _cli(tmp_path, "coordinator", "start", str(d))
    _assert_one_error_line(res, CONFIG, "[train].batch_size")
    assert not (d / "logs").exists() and not (d / "superlink.db").exists()


def test_invite_with_unreachable_postgres_ledger(tmp_path: Path) -> None:
    port = free_port()  # bound and closed again: nothing listens there
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/x"
    d = _run_dir_with(tmp_path, f'[ledger]\nurl = "{url}"\n')
    res = _cli(tmp_path, "coordinator", "invite", str(d), "--institution", "U")
    _assert_one_error_line(res, LEDGER, "cannot open ledger", f"127.0.0.1:{port}")
    assert "hunter2" not in res.stderr  # the password is masked


@pytest.mark.parametrize("ttl", ["0", "-1", "nan"])
def test_invite_ttl_must_be_positive(tmp_path: Path, ttl: str) -> None:
    # in-process (typer's runner): the same wrapper, without another interpreter start
    from typer.testing import CliRunner

    from coordinator.cli import app

    rd = init_run(tmp_path / "run")
    res = CliRunner().invoke(app, ["invite", str(rd.path), "--institution", "U",
                                   "--ttl-hours", ttl])
    assert (res.exit_code, res.stdout) == (1, "")
    assert res.stderr == "error: --ttl-hours must be positive\n"
    with rd.ledger() as ledger:
        assert ledger.invites() == []


# -- atom-node ------------------------------------------------------------------------------


def _join(tmp_path: Path, *args: str) -> Result:
    return _cli(tmp_path, "node", "join", *args, "--home", str(tmp_path / "node-home"))


def test_join_unreachable_coordinator(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    token = InviteToken(address, new_secret(), "ab" * 32).encode()
    res = _join(tmp_path, address, "--token", token)
    _assert_one_error_line(res, NETWORK, f"cannot reach coordinator at {address}")
    assert not (tmp_path / "env-node-home").exists()


def test_join_takes_the_address_from_the_token(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    token = InviteToken(address, new_secret(), "ab" * 32).encode()
    res = _join(tmp_path, "--token", token)  # no COORDINATOR argument
    _assert_one_error_line(res, NETWORK, f"cannot reach coordinator at {address}")


def test_join_with_another_address_than_the_tokens_says_so_and_uses_it(tmp_path: Path) -> None:
    mine, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    token = InviteToken(other, new_secret(), "ab" * 32).encode()
    res = _join(tmp_path, mine, "--token", token)
    warning, error = res.stderr.splitlines()
    assert warning == f"warning: using {mine}, not {other} from the invite token"
    assert error.startswith(f"error: cannot reach coordinator at {mine}") and res.rc == NETWORK


def test_join_with_more_gpus_than_the_machine_has(tmp_path: Path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = _join(tmp_path, f"127.0.0.1:{free_port()}", "--token", "garbage", "--gpus", "2")
    _assert_one_error_line(res, CONFIG, "--gpus 2: this machine has no CUDA GPU")


def test_join_with_garbage_token(tmp_path: Path) -> None:
    res = _join(tmp_path, f"127.0.0.1:{free_port()}", "--token", "garbage")
    _assert_one_error_line(res, ENROLLMENT, "invalid invite token")


@pytest.mark.parametrize("address", [True, False], ids=["address", "nothing"])
def test_join_without_token_on_a_fresh_home(tmp_path: Path, address: bool) -> None:
    res = _join(tmp_path, *([f"127.0.0.1:{free_port()}"] if address else []))
    _assert_one_error_line(res, ENROLLMENT, "not enrolled", "--token")
    assert not (tmp_path / "env-node-home").exists()


_GOOD_ENROLLMENT = {"node_id": 1, "flower_node_id": "7", "name": "n", "institution": "U",
                    "run_id": "r", "coordinator_address": "127.0.0.1:1",
                    "fleet_address": "127.0.0.1:2"}


@pytest.mark.parametrize("content", [
    b"{not json",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b"null",
    json.dumps({"node_id": 1}).encode(),
    json.dumps({**_GOOD_ENROLLMENT, "extra": 1}).encode(),
    json.dumps({**_GOOD_ENROLLMENT, "node_id": "one"}).encode(),
    json.dumps({**_GOOD_ENROLLMENT, "fleet_address": 5}).encode(),
    None,  # node.json is a directory
], ids=["syntax", "binary", "list", "null", "missing-fields", "extra-field", "str-id",
        "int-address", "directory"])
def test_join_with_corrupt_node_json(tmp_path: Path, content: bytes | None) -> None:
    home = tmp_path / "node-home"
    home.mkdir()
    if content is None:
        (home / "node.json").mkdir()
    else:
        (home / "node.json").write_bytes(content)
    res = _join(tmp_path, "127.0.0.1:1")
    _assert_one_error_line(res, CONFIG, "node.json")


def test_node_home_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="cannot use .* as the node home") as info:
        NodeHome(tmp_path / "afile").key()
    assert "\n" not in str(info.value)


# -- corrupt checkpoints (in-process) ------------------------------------------------------


@dataclass
class Store:
    rd: RunDir
    cfg: RunConfig
    ledger: Ledger
    ckpt: Path  # version 0's weights file


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    rd = init_run(tmp_path / "run")
    cfg = rd.config()
    ledger = rd.ledger(cfg)
    try:
        ModelStore.open(rd.checkpoints, cfg, ledger)  # writes and records version 0
        (version,) = ledger.versions()
        yield Store(rd, cfg, ledger, Path(version.path))
    finally:
        ledger.close()


def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("where", ["weights", "header", "truncated", "missing-meta"])
def test_corrupt_checkpoint_is_one_checkpoint_error(store: Store, where: str) -> None:
    ckpt = store.ckpt
    assert ModelStore.open(store.rd.checkpoints, store.cfg, store.ledger).version == 0
    if where == "weights":
        _flip(ckpt, ckpt.stat().st_size - 3)
    elif where == "header":
        _flip(ckpt, 12)
    elif where == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    else:
        ckpt.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError) as info:
        ModelStore.open(store.rd.checkpoints, store.cfg, store.ledger)
    msg = str(info.value)
    assert "\n" not in msg and str(ckpt) in msg and CheckpointError.exit_code == CHECKPOINT


def test_any_flipped_byte_is_caught(store: Store) -> None:
    ckpt = store.ckpt
    good = ckpt.read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    offsets = sorted({*range(0, header_end, max(1, header_end // 24)),
                      *range(header_end, len(good), max(1, (len(good) - header_end) // 24)),
                      len(good) - 1})
    for offset in offsets:
        ckpt.write_bytes(good)
        _flip(ckpt, offset)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(ckpt)
        assert "\n" not in str(info.value), offset


def test_corrupt_outer_state_is_one_checkpoint_error(store: Store) -> None:
    version = store.ledger.latest_version().version
    (store.rd.checkpoints / f"outer-state-{version}.safetensors").write_bytes(
        b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="outer optimizer state") as info:
        ModelStore.open(store.rd.checkpoints, store.cfg, store.ledger)
    assert "\n" not in str(info.value)

